// Runs the CUDA kernels of kernels/cuda on the host, for the unit tests
// (src/kernels/device): each block's threads are fibers (ucontext) that a
// scheduler resumes in turn; they switch only at barriers. Launches on
// different OS threads are independent.
#include <ucontext.h>

#include <functional>
#include <string>
#include <utility>
#include <vector>

#define SOLLOL_EMU 1
#include "emu.h"
#include "../cuda/decode.cu"

thread_local emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {
namespace {

constexpr std::size_t STACK = 64 << 10;
constexpr int WARP = 32;

enum class Wait { None, Block, Warp };

struct Fiber {
    ucontext_t ctx;
    bool done = false;
    Wait wait = Wait::None;
    uint64_t gen = 0;  // the barrier generation it waits to see pass
    int parity = 0;    // which of the warp's two exchange buffers is next
};

struct Block {
    std::function<void()> body;
    std::vector<Fiber> fibers;
    std::vector<char> stacks;
    ucontext_t sched;
    int cur = 0, live = 0;
    uint64_t block_gen = 0;
    int block_arrived = 0;
    std::vector<uint64_t> warp_gen;
    std::vector<int> warp_arrived, warp_live;
    std::vector<uint64_t> slots;  // [warp][parity][lane], 8 bytes each
};

thread_local Block* B = nullptr;

void yield() { swapcontext(&B->fibers[B->cur].ctx, &B->sched); }

void arrive_block() {
    if (++B->block_arrived >= B->live) B->block_arrived = 0, B->block_gen++;
}

void arrive_warp(int w) {
    if (++B->warp_arrived[w] >= B->warp_live[w]) B->warp_arrived[w] = 0, B->warp_gen[w]++;
}

void entry() {
    B->body();
    // Threads that exit no longer count at barriers (as on the device); the
    // ones left waiting may now be complete.
    const int w = B->cur / WARP;
    B->fibers[B->cur].done = true;
    B->live--, B->warp_live[w]--;
    if (B->block_arrived > 0 && B->block_arrived >= B->live) B->block_arrived = 0, B->block_gen++;
    if (B->warp_arrived[w] > 0 && B->warp_arrived[w] >= B->warp_live[w]) B->warp_arrived[w] = 0, B->warp_gen[w]++;
}

void set_thread_index(int t) {
    threadIdx = emu_dim3{t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y)};
}

// Runs one block to the end; false on a deadlock (threads waiting at
// barriers that the others never reach).
bool run_block(Block& b) {
    const int n = (int)b.fibers.size();
    for (int t = 0; t < n; t++) {
        Fiber& f = b.fibers[t];
        f = Fiber{};
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = b.stacks.data() + (std::size_t)t * STACK;
        f.ctx.uc_stack.ss_size = STACK;
        f.ctx.uc_link = &b.sched;
        makecontext(&f.ctx, entry, 0);
    }
    b.live = n;
    b.block_arrived = 0;
    for (int w = 0; w < (int)b.warp_live.size(); w++) b.warp_live[w] = std::min(WARP, n - w * WARP), b.warp_arrived[w] = 0;
    for (int finished = 0; finished < n;) {
        bool progress = false;
        finished = 0;
        for (int t = 0; t < n; t++) {
            Fiber& f = b.fibers[t];
            if (f.done) {
                finished++;
                continue;
            }
            if (f.wait == Wait::Block && b.block_gen == f.gen) continue;
            if (f.wait == Wait::Warp && b.warp_gen[t / WARP] == f.gen) continue;
            f.wait = Wait::None;
            b.cur = t;
            set_thread_index(t);
            swapcontext(&b.sched, &f.ctx);
            progress = true;
        }
        if (!progress && finished < n) return false;
    }
    return true;
}

}  // namespace

void sync_block() {
    Fiber& f = B->fibers[B->cur];
    const uint64_t g = B->block_gen;
    arrive_block();
    if (B->block_gen == g) f.wait = Wait::Block, f.gen = g, yield();
}

void sync_warp() {
    const int w = B->cur / WARP;
    Fiber& f = B->fibers[B->cur];
    const uint64_t g = B->warp_gen[w];
    arrive_warp(w);
    if (B->warp_gen[w] == g) f.wait = Wait::Warp, f.gen = g, yield();
}

// Two buffers in turn: a lane can write the next exchange's buffer while a
// slower one still reads this one, never the one after (it waits for the
// slow lane at the next exchange).
void exchange(const void* in, void* out, std::size_t size, int src) {
    const int w = B->cur / WARP, lane = B->cur % WARP;
    Fiber& f = B->fibers[B->cur];
    uint64_t* buf = B->slots.data() + ((std::size_t)w * 2 + f.parity) * WARP;
    std::memcpy(&buf[lane], in, size);
    sync_warp();
    std::memcpy(out, &buf[src % WARP], size);
    f.parity ^= 1;
}

int lane() { return B->cur % WARP; }

}  // namespace emu

namespace {

template <class... A, std::size_t... I>
void call_with(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}

// A kernel called with cuLaunchKernel's arguments: one pointer per parameter.
struct Kernel {
    const char* name;
    std::function<void(void**)> call;
};

template <class... A> Kernel kernel(const char* name, void (*f)(A...)) {
    return Kernel{name, [f](void** args) { call_with(f, args, std::index_sequence_for<A...>{}); }};
}

const std::vector<Kernel>& kernels() {
    static const std::vector<Kernel> all = {
        kernel("rmsnorm", rmsnorm),         kernel("quantize_q8", quantize_q8),
        kernel("matvec_q4_0", matvec_q4_0), kernel("glu_q4_0", glu_q4_0),
        kernel("get_rows_q4_0", get_rows_q4_0), kernel("matvec_q4_1", matvec_q4_1),
        kernel("glu_q4_1", glu_q4_1),       kernel("get_rows_q4_1", get_rows_q4_1),
        kernel("matvec_q8_0", matvec_q8_0), kernel("glu_q8_0", glu_q8_0),
        kernel("get_rows_q8_0", get_rows_q8_0), kernel("matvec_q4_k", matvec_q4_k),
        kernel("glu_q4_k", glu_q4_k),       kernel("get_rows_q4_k", get_rows_q4_k),
        kernel("matvec_q6_k", matvec_q6_k), kernel("glu_q6_k", glu_q6_k),
        kernel("get_rows_q6_k", get_rows_q6_k), kernel("matvec_f16", matvec_f16),
        kernel("glu_f16", glu_f16),         kernel("get_rows_f16", get_rows_f16),
        kernel("rope_kv", rope_kv),         kernel("attn_split", attn_split),
        kernel("attn_combine", attn_combine),       kernel("rows_op", rows_op),
        kernel("gather_rows", gather_rows),         kernel("scatter_add", scatter_add),
        kernel("matvec_f32", matvec_f32),           kernel("glu_f32", glu_f32),
        kernel("get_rows_f32", get_rows_f32),       kernel("f32_to_f16", f32_to_f16),
        kernel("to_f16_q4_0", to_f16_q4_0),         kernel("to_f16_q4_1", to_f16_q4_1),
        kernel("to_f16_q8_0", to_f16_q8_0),         kernel("to_f16_q4_k", to_f16_q4_k),
        kernel("to_f16_q6_k", to_f16_q6_k),         kernel("to_f16_f16", to_f16_f16),
        kernel("to_f16_f32", to_f16_f32),
    };
    return all;
}

}  // namespace

// 0: ran; 1: no kernel of that name; 2: a block deadlocked at a barrier;
// 3: a block size the emulator does not take (not a multiple of 32, or over 1024).
extern "C" int sollol_emu_launch(const char* name, const unsigned grid[3], const unsigned block[3], void** args) {
    const Kernel* k = nullptr;
    for (const Kernel& c : kernels())
        if (std::string(c.name) == name) k = &c;
    if (!k) return 1;
    const int n = (int)(block[0] * block[1] * block[2]);
    if (n <= 0 || n > 1024 || n % emu::WARP != 0) return 3;
    emu::Block b;
    b.body = [k, args] { k->call(args); };
    b.fibers.resize(n);
    b.stacks.resize((std::size_t)n * emu::STACK);
    const int warps = n / emu::WARP;
    b.warp_gen.assign(warps, 0);
    b.warp_arrived.assign(warps, 0);
    b.warp_live.assign(warps, 0);
    b.slots.assign((std::size_t)warps * 2 * emu::WARP, 0);
    emu::Block* outer = emu::B;
    emu::B = &b;
    blockDim = emu_dim3{block[0], block[1], block[2]};
    gridDim = emu_dim3{grid[0], grid[1], grid[2]};
    int rc = 0;
    for (unsigned z = 0; z < grid[2] && rc == 0; z++)
        for (unsigned y = 0; y < grid[1] && rc == 0; y++)
            for (unsigned x = 0; x < grid[0] && rc == 0; x++) {
                blockIdx = emu_dim3{x, y, z};
                if (!emu::run_block(b)) rc = 2;
            }
    emu::B = outer;
    return rc;
}
