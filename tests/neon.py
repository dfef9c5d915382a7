"""sollol's NEON kernels on an emulated aarch64 CPU (unicorn), against the
scalar reference built from the same source and an f64 product in numpy.

Usage: python3 tests/neon.py HARNESS_ELF [SEED]

HARNESS_ELF is tests/neon/lib.rs built for aarch64 and linked statically
(tests/neon.rs does both). Each weight type gets fresh random blocks and
activations (the seed is printed); activations are quantized by sollol's
own quantizer on the emulated CPU. Checked, for 1 to 4 activation rows, with and without `sdot`:
  * NEON vs the scalar reference: float summation order only
    (|Δ| ≤ 1e-5 · Σ|w·a| + 1e-6, the bound the x86 kernels are held to);
  * NEON vs f64 over the same 8-bit values and scales (the same bound);
  * a row's result does not depend on its batch (bit for bit).
"""

import struct
import sys

import numpy as np
from unicorn import UC_ARCH_ARM64, UC_MODE_ARM, Uc
from unicorn import arm64_const as A

QK = 32
# name, discriminant (WeightType), block bytes, f16 scales at the front, offset, 5th bits
TYPES = [
    ("q4_0", 0, 18, 1, 8, False),
    ("q4_1", 1, 20, 2, 0, False),
    ("q5_0", 2, 22, 1, 16, True),
    ("q5_1", 3, 24, 2, 0, True),
    ("q8_0", 4, 34, 1, 0, False),
]
ACT_BLOCK = 44  # BlockQ8: d f32, s f32, sum i32, qs [i8; 32]

HEAP, HEAP_SIZE = 0x4000_0000, 64 << 20
STACK, STACK_SIZE = 0x7000_0000, 1 << 20
RETURN = 0x7F00_0000


class Emulated:
    """A statically linked aarch64 ELF loaded into unicorn, its functions callable."""

    def __init__(self, path):
        elf = open(path, "rb").read()
        assert elf[:4] == b"\x7fELF" and struct.unpack_from("<H", elf, 18)[0] == 183, f"{path}: not an aarch64 ELF"
        self.uc = Uc(UC_ARCH_ARM64, UC_MODE_ARM)
        # The "max" model: every extension QEMU knows, the dot product among them.
        self.uc.ctl_set_cpu_model(A.UC_CPU_ARM64_MAX)
        phoff, shoff = struct.unpack_from("<QQ", elf, 32)
        phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from("<HHHHH", elf, 54)
        for i in range(phnum):
            p_type, _, off, vaddr, _, filesz, memsz, _ = struct.unpack_from("<IIQQQQQQ", elf, phoff + i * phentsize)
            if p_type != 1 or memsz == 0:  # PT_LOAD
                continue
            start, end = vaddr & ~0xFFF, (vaddr + memsz + 0xFFF) & ~0xFFF
            self.uc.mem_map(start, end - start)
            self.uc.mem_write(vaddr, elf[off : off + filesz])
        sections = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
        self.symbols = {}
        for s in sections:
            if s[1] != 2:  # SHT_SYMTAB
                continue
            strtab = sections[s[6]]
            for j in range(s[5] // 24):
                name_off, _, _, _, value, _ = struct.unpack_from("<IBBHQQ", elf, s[4] + j * 24)
                start = strtab[4] + name_off
                name = elf[start : elf.index(b"\0", start)].decode()
                if value:
                    self.symbols[name] = value
        self.uc.mem_map(HEAP, HEAP_SIZE)
        self.uc.mem_map(STACK, STACK_SIZE)
        self.uc.mem_map(RETURN, 0x1000)
        # FP and SIMD instructions enabled at EL0/EL1 (CPACR_EL1.FPEN).
        self.uc.reg_write(A.UC_ARM64_REG_CPACR_EL1, 3 << 20)
        self.top = HEAP

    def alloc(self, data):
        """Copies bytes to the emulated heap (16-byte aligned); returns the address."""
        addr = self.top
        self.top = (self.top + len(data) + 15) & ~15
        assert self.top <= HEAP + HEAP_SIZE, "emulated heap exhausted"
        self.uc.mem_write(addr, bytes(data))
        return addr

    def read(self, addr, n):
        return bytes(self.uc.mem_read(addr, n))

    def call(self, name, *args):
        """Calls `name` with integer/pointer arguments; returns (x0, s0 as f32)."""
        regs = [getattr(A, f"UC_ARM64_REG_X{i}") for i in range(8)]
        for reg, value in zip(regs, args):
            self.uc.reg_write(reg, value)
        self.uc.reg_write(A.UC_ARM64_REG_SP, STACK + STACK_SIZE - 64)
        self.uc.reg_write(A.UC_ARM64_REG_X30, RETURN)
        self.uc.emu_start(self.symbols[name], RETURN)
        s0 = struct.unpack("<f", struct.pack("<I", self.uc.reg_read(A.UC_ARM64_REG_S0) & 0xFFFFFFFF))[0]
        return self.uc.reg_read(A.UC_ARM64_REG_X0), s0


def random_blocks(rng, bsize, scales, n):
    """Random bytes are valid blocks but for the f16 scales: small finite ones."""
    data = rng.integers(0, 256, size=(n, bsize), dtype=np.uint8)
    for s in range(scales):
        data[:, 2 * s : 2 * s + 2] = rng.uniform(-0.05, 0.05, size=n).astype(np.float16).view(np.uint8).reshape(n, 2)
    return data


def unpack(data, bsize, scales, offset, fifth):
    """Blocks (rows of bytes) → (scale, minimum, values minus the offset), ggml's layouts."""
    d = data[:, 0:2].copy().view(np.float16)[:, 0].astype(np.float64)
    m = data[:, 2:4].copy().view(np.float16)[:, 0].astype(np.float64) if scales == 2 else np.zeros(len(data))
    if bsize == 34:
        return d, m, data[:, 2:].view(np.int8).astype(np.float64)
    qs = data[:, bsize - 16 :]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int64)
    if fifth:
        qh = data[:, 2 * scales : 2 * scales + 4].copy().view("<u4")[:, 0].astype(np.int64)
        q |= ((qh[:, None] >> np.arange(QK)) & 1) << 4
    return d, m, (q - offset).astype(np.float64)


def main():
    emu = Emulated(sys.argv[1])
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else int(np.random.SeedSequence().entropy % (1 << 63))
    print(f"SOLLOL_TEST_SEED={seed}")
    rng = np.random.default_rng(seed)
    # 5 blocks per row: an odd count; 7 weight rows.
    rows, cols, n_acts = 7, 160, 4
    nb = cols // QK
    failures = []
    for name, t, bsize, scales, offset, fifth in TYPES:
        w = random_blocks(rng, bsize, scales, rows * nb)
        w_addr = emu.alloc(w.tobytes())
        x = rng.uniform(-3.0, 3.0, size=(n_acts, cols)).astype(np.float32)
        act_addrs = []
        for i in range(n_acts):
            out = emu.alloc(bytes(nb * ACT_BLOCK))
            emu.call("sollol_quantize_q8", emu.alloc(x[i].tobytes()), cols, out)
            act_addrs.append(out)
        # The quantized activations as read back: (d, s, qs) per block.
        acts = []
        for addr in act_addrs:
            raw = emu.read(addr, nb * ACT_BLOCK)
            blocks = [struct.unpack_from("<ffi32b", raw, b * ACT_BLOCK) for b in range(nb)]
            acts.append([(np.float64(b[0]), np.float64(b[1]), np.array(b[3:], dtype=np.float64)) for b in blocks])
        d, m, q = unpack(w, bsize, scales, offset, fifth)

        def reference(j, a):
            """Weight row j · activation row a in f64: Σ_b d_w d_a Σ q_w q_a + m_w s_a (ggml's q8_1 sum)."""
            terms = [d[k] * a_d * (q[k] @ a_q) + m[k] * a_s for k, (a_d, a_s, a_q) in zip(range(j * nb, (j + 1) * nb), a)]
            mag = sum(abs(d[k] * a_d) * (np.abs(q[k]) @ np.abs(a_q)) + abs(m[k] * a_s) for k, (a_d, a_s, a_q) in zip(range(j * nb, (j + 1) * nb), a))
            return float(sum(terms)), float(mag)

        for dotprod, r in [(dotprod, r) for dotprod in (0, 1) for r in range(1, n_acts + 1)]:
            variant = ("neon", "sdot")[dotprod]
            if r == 1:
                alone = None
            outs = [emu.alloc(bytes(4 * rows)) for _ in range(r)]
            status, _ = emu.call(
                "sollol_neon_gemm",
                t,
                r,
                dotprod,
                w_addr,
                nb * bsize,
                rows,
                emu.alloc(struct.pack(f"<{r}Q", *act_addrs[:r])),
                emu.alloc(struct.pack(f"<{r}Q", *outs)),
            )
            assert status == 0, f"{name} {variant}: the harness refused {r} rows"
            got = np.array([struct.unpack(f"<{rows}f", emu.read(o, 4 * rows)) for o in outs])
            if alone is None:
                alone = got[0].copy()
            elif not np.array_equal(got[0], alone):
                failures.append(f"{name} {variant}: row 0 batched with {r - 1} others gave {got[0]}, alone {alone}")
            for i in range(r):
                for j in range(rows):
                    _, scalar = emu.call("sollol_scalar_dot", t, w_addr + j * nb * bsize, act_addrs[i], nb)
                    exact, mag = reference(j, acts[i])
                    bound = 1e-5 * mag + 1e-6
                    g = float(got[i, j])
                    if abs(g - scalar) > bound:
                        failures.append(f"{name} {variant} rows {r} act {i} weight row {j}: {g} scalar {scalar}")
                    if abs(g - exact) > bound:
                        failures.append(f"{name} {variant} rows {r} act {i} weight row {j}: {g} f64 {exact}")
        print(f"{name}: {rows} weight rows x 1..{n_acts} activation rows, neon and sdot, checked")
    if failures:
        print("\n".join(failures[:20]))
        counts = {name: sum(f.startswith(name) for f in failures) for name, *_ in TYPES}
        print(f"{len(failures)} failures: {counts}")
        sys.exit(1)
    print("neon kernels ok")


if __name__ == "__main__":
    main()
