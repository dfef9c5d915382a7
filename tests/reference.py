#!/usr/bin/env python3
"""An independent reference forward pass, in numpy, for llama (and Mixtral),
qwen2, qwen3, qwen3moe, gemma3, phi3 (and its LongRoPE) and phi2.

It reads the model file itself (its own GGUF and safetensors parsers, its own
dequantization of F32/F16/Q8_0/Q4_0/Q4_1 blocks) and runs a plain causal
forward over the whole token sequence, no KV cache, written from the papers
and HF's modeling_llama / modeling_qwen2 / modeling_qwen3 / modeling_gemma3
(and modeling_mixtral / modeling_qwen3_moe / modeling_phi3 / modeling_phi)
rather than from sollol's code.

usage: reference.py MODEL TOKENS_CSV  ->  JSON list of logits, one per position
"""
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np

GGUF_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0"}


def read_gguf(path):
    data = Path(path).read_bytes()
    off = 0

    def take(fmt):
        nonlocal off
        vals = struct.unpack_from("<" + fmt, data, off)
        off += struct.calcsize("<" + fmt)
        return vals[0] if len(vals) == 1 else vals

    def string():
        nonlocal off
        n = take("Q")
        s = data[off:off + n].decode("utf-8")
        off += n
        return s

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def value(t):
        if t in scalar:
            return take(scalar[t])
        if t == 8:
            return string()
        if t == 9:
            et, n = take("I"), take("Q")
            return [value(et) for _ in range(n)]
        raise ValueError(f"metadata type {t}")

    assert data[:4] == b"GGUF", "not a GGUF file"
    off = 4
    version = take("I")
    assert version in (2, 3), f"GGUF version {version}"
    n_tensors, n_kv = take("Q"), take("Q")
    meta = {}
    for _ in range(n_kv):
        k = string()
        meta[k] = value(take("I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        nd = take("I")
        dims = [take("Q") for _ in range(nd)]
        t = take("I")
        o = take("Q")
        infos.append((name, dims, t, o))
    align = meta.get("general.alignment", 32)
    base = (off + align - 1) // align * align
    tensors, kinds, mins = {}, {}, {}
    for name, dims, t, o in infos:
        shape = list(reversed(dims))  # GGUF lists the fastest dimension first
        n = int(np.prod(shape))
        values, m = dequant(data, base + o, GGUF_TYPES[t], n)
        tensors[name] = values.reshape(shape)
        kinds[name] = GGUF_TYPES[t]
        if m is not None:
            mins[name] = m.reshape(shape[:-1] + [shape[-1] // 32])
    return meta, tensors, kinds, mins


def dequant(data, start, kind, n):
    """-> (values, per-block offsets for Q4_1 else None)"""
    if kind == "F32":
        return np.frombuffer(data, np.float32, n, start).astype(np.float64), None
    if kind == "F16":
        return np.frombuffer(data, np.float16, n, start).astype(np.float64), None
    nb = n // 32
    if kind == "Q8_0":  # f16 scale, 32 int8
        blk = np.frombuffer(data, np.uint8, nb * 34, start).reshape(nb, 34)
        d = blk[:, :2].copy().view(np.float16).astype(np.float64)
        q = blk[:, 2:].copy().view(np.int8).astype(np.float64)
        return (d * q).reshape(n), None
    if kind in ("Q4_0", "Q4_1"):
        size = 18 if kind == "Q4_0" else 20
        blk = np.frombuffer(data, np.uint8, nb * size, start).reshape(nb, size)
        d = blk[:, :2].copy().view(np.float16).astype(np.float64)
        qs = blk[:, size - 16:]
        # element j < 16 is the low nibble of byte j, element j + 16 its high nibble
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float64)
        if kind == "Q4_0":
            return (d * (q - 8)).reshape(n), None
        m = blk[:, 2:4].copy().view(np.float16).astype(np.float64)
        return (d * q + m).reshape(n), m.reshape(nb)
    if kind in ("Q5_0", "Q5_1"):
        size = 22 if kind == "Q5_0" else 24
        blk = np.frombuffer(data, np.uint8, nb * size, start).reshape(nb, size)
        d = blk[:, :2].copy().view(np.float16).astype(np.float64)
        qs = blk[:, size - 16:]
        qh = blk[:, size - 20:size - 16].copy().view(np.uint32)  # [nb, 1]
        # bit j of qh is the fifth bit of element j
        high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.float64) * 16
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float64) + high
        if kind == "Q5_0":
            return (d * (q - 16)).reshape(n), None
        m = blk[:, 2:4].copy().view(np.float16).astype(np.float64)
        return (d * q + m).reshape(n), m.reshape(nb)
    raise ValueError(kind)


def read_safetensors_dir(path):
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        data = f.read_bytes()
        (hlen,) = struct.unpack_from("<Q", data, 0)
        header = json.loads(data[8:8 + hlen])
        for name, info in header.items():
            if name == "__metadata__":
                continue
            a, b = info["data_offsets"]
            raw = data[8 + hlen + a:8 + hlen + b]
            if info["dtype"] == "BF16":
                arr = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                arr = np.frombuffer(raw, {"F32": np.float32, "F16": np.float16}[info["dtype"]])
            tensors[name] = arr.astype(np.float64).reshape(info["shape"])
    return cfg, tensors


# HF names of the per-layer tensors; gemma's MLP norms sit around the MLP.
HF_NAMES = dict(qkv="self_attn.qkv_proj", gate_up="mlp.gate_up_proj", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
                gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj", attn_norm="input_layernorm",
                ffn_norm="post_attention_layernorm", q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")
HF_GEMMA = dict(post_attn_norm="post_attention_layernorm", ffn_norm="pre_feedforward_layernorm",
                post_ffn_norm="post_feedforward_layernorm")
GGUF_NAMES = dict(router="ffn_gate_inp", gate_exps="ffn_gate_exps", up_exps="ffn_up_exps", down_exps="ffn_down_exps",
                  qkv="attn_qkv", q="attn_q", k="attn_k", v="attn_v", o="attn_output", gate="ffn_gate", up="ffn_up", down="ffn_down",
                  attn_norm="attn_norm", ffn_norm="ffn_norm", q_norm="attn_q_norm", k_norm="attn_k_norm",
                  post_attn_norm="post_attention_norm", post_ffn_norm="post_ffw_norm")


# HF phi (Phi-2): a dense output projection, fc1/fc2, its final LayerNorm.
HF_PHI = dict(o="self_attn.dense", up="mlp.fc1", down="mlp.fc2")
# The router and each expert's SwiGLU matrices (gate, up, down), per HF model type.
HF_EXPERTS = {"mixtral": ("block_sparse_moe.gate", "block_sparse_moe.experts.{e}.", ("w1", "w3", "w2")),
              "qwen3_moe": ("mlp.gate", "mlp.experts.{e}.", ("gate_proj", "up_proj", "down_proj"))}


def longrope(ctx, trained, long, short, attn_factor):
    """Phi-3's LongRoPE: the long factors where the context passes the trained
    one (llama.cpp chooses by its context, as sollol does; HF by the sequence),
    cos/sin scaled by the attention factor (HF's formula where none is given)."""
    if attn_factor is None:
        scale = ctx / trained
        attn_factor = np.sqrt(1 + np.log(scale) / np.log(trained)) if scale > 1 else 1.0
    return np.asarray(long if ctx > trained else short, np.float64), attn_factor


def load(path):
    """-> (hparams, per-layer weights dict, embed, final norm {weight, bias}, lm_head)"""
    if Path(path).is_dir():
        cfg, t = read_safetensors_dir(path)
        mt = cfg["model_type"]
        arch = {"gemma3_text": "gemma3", "phi": "phi2", "qwen3_moe": "qwen3moe", "mixtral": "llama"}.get(mt, mt)
        hp = dict(arch=arch, n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
                  n_kv=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                  eps=cfg.get("rms_norm_eps", cfg.get("layer_norm_eps", 1e-6)),
                  theta=cfg.get("rope_theta", 10000.0), interleaved=False, window=cfg.get("sliding_window"),
                  pattern=cfg.get("sliding_window_pattern", 6), top_k=cfg.get("num_experts_per_tok"))
        d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        hp["rope_dim"] = int(d * cfg.get("partial_rotary_factor", 1.0))
        rs = cfg.get("rope_scaling") or {}
        if rs.get("type", rs.get("rope_type")) in ("longrope", "su"):
            trained = rs.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
            hp["factors"], hp["mscale"] = longrope(cfg["max_position_embeddings"], trained, rs["long_factor"],
                                                   rs["short_factor"], rs.get("attention_factor"))
        names = dict(HF_NAMES, **(HF_GEMMA if arch == "gemma3" else {}), **(HF_PHI if arch == "phi2" else {}))
        layers = [{k: {s: t.get(f"model.layers.{i}.{v}.{s}") for s in ("weight", "bias")} for k, v in names.items()}
                  for i in range(hp["n_layers"])]
        if mt in HF_EXPERTS:
            router, expert, parts = HF_EXPERTS[mt]
            n = cfg.get("num_local_experts", cfg.get("num_experts"))
            for i, L in enumerate(layers):
                p = f"model.layers.{i}."
                L["router"] = {"weight": t[p + router + ".weight"], "bias": None}
                for role, part in zip(("gate", "up", "down"), parts):
                    w = np.stack([t[p + expert.format(e=e) + part + ".weight"] for e in range(n)])
                    L[f"{role}_exps"] = {"weight": w, "bias": None, "kind": None, "m": None}
        if arch == "gemma3":  # Gemma3RMSNorm computes x_normed * (1 + w)
            for L in layers:
                for k in ("attn_norm", "ffn_norm", "q_norm", "k_norm", "post_attn_norm", "post_ffn_norm"):
                    L[k]["weight"] = 1.0 + L[k]["weight"]
        embed = t["model.embed_tokens.weight"]
        head = embed if cfg.get("tie_word_embeddings") or "lm_head.weight" not in t else t["lm_head.weight"]
        final = "model.final_layernorm" if arch == "phi2" else "model.norm"
        norm = {"weight": t[final + ".weight"] + (1.0 if arch == "gemma3" else 0.0), "bias": t.get(final + ".bias")}
        return hp, layers, embed, norm, {"weight": head, "bias": t.get("lm_head.bias")}
    meta, t, kinds, mins = read_gguf(path)
    arch = meta["general.architecture"]
    hp = dict(arch=arch, n_layers=meta[f"{arch}.block_count"], n_heads=meta[f"{arch}.attention.head_count"],
              n_kv=meta.get(f"{arch}.attention.head_count_kv", meta[f"{arch}.attention.head_count"]),
              eps=meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
              theta=meta.get(f"{arch}.rope.freq_base", 10000.0),
              # llama.cpp permutes llama q/k rows so that pairs are adjacent; qwen2 keeps HF's halves.
              interleaved=arch in ("llama", "mistral"), window=meta.get(f"{arch}.attention.sliding_window"),
              pattern=6, top_k=meta.get(f"{arch}.expert_used_count"),
              rope_dim=meta.get(f"{arch}.rope.dimension_count"))
    if arch == "phi2":
        hp["eps"] = meta[f"{arch}.attention.layer_norm_epsilon"]
    if "rope_factors_long.weight" in t:
        ctx = meta[f"{arch}.context_length"]
        hp["factors"], hp["mscale"] = longrope(ctx, meta.get(f"{arch}.rope.scaling.original_context_length", ctx),
                                               t["rope_factors_long.weight"], t["rope_factors_short.weight"],
                                               meta.get(f"{arch}.rope.scaling.attn_factor", 1.0))
    # GGUF gemma norms already hold 1 + w (llama.cpp's converter adds it).
    layers = [{k: gguf_linear(t, kinds, mins, f"blk.{i}.{v}") for k, v in GGUF_NAMES.items() if f"blk.{i}.{v}.weight" in t}
              for i in range(hp["n_layers"])]
    if arch == "phi3":  # its ffn_up holds gate and up (HF's gate_up_proj)
        for L in layers:
            L["gate_up"] = L.pop("up")
    for i, L in enumerate(layers):  # experts of older files: one matrix each
        if "router" in L and "gate_exps" not in L:
            n = L["router"]["weight"].shape[0]
            for part in ("gate", "up", "down"):
                ps = [gguf_linear(t, kinds, mins, f"blk.{i}.ffn_{part}.{e}") for e in range(n)]
                L[f"{part}_exps"] = {"weight": np.stack([p["weight"] for p in ps]), "bias": None, "kind": ps[0]["kind"],
                                     "m": None if ps[0]["m"] is None else np.stack([p["m"] for p in ps])}
    embed = t["token_embd.weight"]
    head = gguf_linear(t, kinds, mins, "output" if "output.weight" in t else "token_embd")
    return hp, layers, embed, {"weight": t["output_norm.weight"], "bias": t.get("output_norm.bias")}, head


def gguf_linear(t, kinds, mins, prefix):
    w = f"{prefix}.weight"
    return {"weight": t[w], "bias": t.get(f"{prefix}.bias"), "kind": kinds[w], "m": mins.get(w)}


def layer_norm(x, p, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["weight"] + p["bias"]


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def quantize_activations(x, kind):
    """ggml's integer dot products first quantize the activation row into 32-wide
    blocks of int8 with an f16 scale (Q8_0 for Q8_0/Q4_0 weights, Q8_1 for Q4_1):
    q = round(x / d) with d = max|x| / 127 in f32, then the stored scale is f16(d).
    Q8_1 also stores s = d * sum(q) in f16, which multiplies the weight block's
    offset m; mathematically that is the dot with the dequantized row."""
    shape = x.shape
    b = x.reshape(-1, 32).astype(np.float32)
    d = np.abs(b).max(axis=1, keepdims=True) / np.float32(127)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    v = b * inv
    q = np.sign(v) * np.floor(np.abs(v) + 0.5)  # C roundf: half away from zero
    return (q * d.astype(np.float16).astype(np.float64)).reshape(shape), q.reshape(-1, 32), d


def linear(x, p):
    if p.get("kind") in ("Q8_0", "Q4_0", "Q5_0"):
        x, _, _ = quantize_activations(x, p["kind"])
    elif p.get("kind") in ("Q4_1", "Q5_1"):
        # w = dw * qw + m per block: dot = sum(dw*dx*qw*qx) + m * f16(dx * sum(qx))
        xq, q, d = quantize_activations(x, p["kind"])
        m = p["m"]  # [out, in / 32]
        y = xq @ (p["weight"] - np.repeat(m, 32, axis=1)).T
        # ggml (and sollol's kernels) store s = f16(d * sum(q)) with d in f32;
        # candle's kernels compute it in f16 arithmetic, f16(f16(sum(q)) * f16(d)).
        # Where the block's offset nearly cancels its scaled values, that one
        # rounding moves logits by percents, so the reference follows the
        # implementation under test (SOLLOL_REF_Q8_1=candle for candle's).
        if os.environ.get("SOLLOL_REF_Q8_1") == "candle":
            s16 = q.sum(axis=1).astype(np.float16).astype(np.float32) * d[:, 0].astype(np.float16).astype(np.float32)
        else:
            s16 = q.sum(axis=1).astype(np.float32) * d[:, 0]
        s = s16.astype(np.float16).astype(np.float64)
        y = y + s.reshape(*x.shape[:-1], m.shape[1]) @ m.T
        return y if p["bias"] is None else y + p["bias"]
    y = x @ p["weight"].T
    return y if p["bias"] is None else y + p["bias"]


def rows(p, a, b):
    """Rows a..b of a linear layer (a part of a fused tensor)."""
    part = {"weight": p["weight"][a:b], "bias": None if p.get("bias") is None else p["bias"][a:b], "kind": p.get("kind")}
    part["m"] = None if p.get("m") is None else p["m"][a:b]
    return part


def unfuse(L, n_q, n_kv):
    """phi3: Q, K, V are the rows of qkv; gate and up the halves of gate_up."""
    if L.get("qkv") is not None and L["qkv"]["weight"] is not None:
        qkv = L["qkv"]
        L["q"], L["k"], L["v"] = rows(qkv, 0, n_q), rows(qkv, n_q, n_q + n_kv), rows(qkv, n_q + n_kv, n_q + 2 * n_kv)
    if L.get("gate_up") is not None and L["gate_up"]["weight"] is not None:
        half = L["gate_up"]["weight"].shape[0] // 2
        L["gate"], L["up"] = rows(L["gate_up"], 0, half), rows(L["gate_up"], half, 2 * half)


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def moe(x, L, top_k):
    """Mixtral / Qwen3-MoE: softmax router, the top_k experts of each token
    (stable: ties to the lower index), their weights renormalized, SwiGLU experts."""
    probs = softmax(linear(x, L["router"]))
    y = np.zeros_like(x)

    def expert(part, e):
        stack = L[f"{part}_exps"]
        return {"weight": stack["weight"][e], "bias": None, "kind": stack["kind"],
                "m": None if stack["m"] is None else stack["m"][e]}

    for r in range(x.shape[0]):
        top = np.argsort(-probs[r], kind="stable")[:top_k]
        w = probs[r, top] / probs[r, top].sum()
        for e, we in zip(top, w):
            xr = x[r:r + 1]
            g = linear(xr, expert("gate", e))
            y[r] += we * linear(g / (1 + np.exp(-g)) * linear(xr, expert("up", e)), expert("down", e))[0]
    return y


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def rope(x, theta, interleaved, rot=None, factors=None, mscale=1.0):
    """x: [heads, seq, d]; rotate pairs by position * theta^(-2i/d) / factor_i,
    of the first `rot` values of each head (phi's partial rotary) or all of
    them; cos and sin scaled by `mscale` (LongRoPE's attention factor)."""
    if rot is not None and rot < x.shape[-1]:
        return np.concatenate([rope(x[..., :rot], theta, interleaved, None, factors, mscale), x[..., rot:]], axis=-1)
    _, seq, d = x.shape
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    if factors is not None:
        inv = inv / factors
    ang = np.arange(seq)[:, None] * inv[None, :]  # [seq, d/2]
    cos, sin = np.cos(ang) * mscale, np.sin(ang) * mscale
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
        return out
    a, b = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def phi2(h, layers, final_norm, head, hp):
    """HF modeling_phi: attention and MLP both read one LayerNorm of the
    input and are added to it; partial rotary; GELU (tanh) MLP; biases."""
    seq, nh = h.shape[0], hp["n_heads"]
    mask = np.triu(np.full((seq, seq), -np.inf), 1)
    for L in layers:
        x = layer_norm(h, {"weight": L["attn_norm"]["weight"], "bias": L["attn_norm"]["bias"]}, hp["eps"])
        if L.get("qkv") is not None and L["qkv"]["weight"] is not None:
            qkv = linear(x, L["qkv"])
        else:  # HF keeps them apart
            qkv = np.concatenate([linear(x, L["q"]), linear(x, L["k"]), linear(x, L["v"])], axis=-1)
        d = qkv.shape[-1] // (3 * nh)
        q, k, v = (qkv[:, i * nh * d:(i + 1) * nh * d].reshape(seq, nh, d).transpose(1, 0, 2) for i in range(3))
        q, k = rope(q, hp["theta"], False, hp["rope_dim"]), rope(k, hp["theta"], False, hp["rope_dim"])
        if os.environ.get("SOLLOL_REF_KV") == "f16":
            k, v = k.astype(np.float16).astype(np.float64), v.astype(np.float16).astype(np.float64)
        att = softmax(q @ k.transpose(0, 2, 1) / np.sqrt(d) + mask)
        a = linear((att @ v).transpose(1, 0, 2).reshape(seq, nh * d), L["o"])
        m = linear(gelu_tanh(linear(x, L["up"])), L["down"])
        h = h + a + m
    return linear(layer_norm(h, final_norm, hp["eps"]), head)


def forward(path, tokens):
    hp, layers, embed, norm, head = load(path)
    h = embed[tokens]  # [seq, hidden]
    gemma = hp["arch"] == "gemma3"
    if gemma:
        h = h * np.sqrt(h.shape[-1])
    seq = len(tokens)
    nh, nkv = hp["n_heads"], hp["n_kv"]
    i, j = np.arange(seq)[:, None], np.arange(seq)[None, :]
    if hp["arch"] == "phi2":
        return phi2(h, layers, norm, head, hp)
    for n, L in enumerate(layers):
        # gemma3: every sixth layer is global; the others see `window` positions with a local rotary base.
        d = h.shape[-1] // nh if "q" not in L or L["q"]["weight"] is None else L["q"]["weight"].shape[0] // nh
        unfuse(L, nh * d, nkv * d)
        local = (gemma and (n + 1) % hp["pattern"] != 0) or (hp["arch"] == "phi3" and hp["window"])
        theta = 10000.0 if gemma and local else hp["theta"]
        hidden = (j > i) | ((i - j >= hp["window"]) if local else False)
        mask = np.where(hidden, -np.inf, 0.0)
        x = rms_norm(h, L["attn_norm"]["weight"], hp["eps"])
        q, k, v = linear(x, L["q"]), linear(x, L["k"]), linear(x, L["v"])
        d = q.shape[-1] // nh
        q, k = q.reshape(seq, nh, d), k.reshape(seq, nkv, d)
        if L.get("q_norm") is not None and L["q_norm"]["weight"] is not None:
            # qwen3 / gemma3: RMSNorm over each head before the rotation
            q, k = rms_norm(q, L["q_norm"]["weight"], hp["eps"]), rms_norm(k, L["k_norm"]["weight"], hp["eps"])
        scaling = dict(factors=hp.get("factors"), mscale=hp.get("mscale", 1.0))
        q = rope(q.transpose(1, 0, 2), theta, hp["interleaved"], **scaling)
        k = rope(k.transpose(1, 0, 2), theta, hp["interleaved"], **scaling)
        v = v.reshape(seq, nkv, d).transpose(1, 0, 2)
        if os.environ.get("SOLLOL_REF_KV") == "f16":
            # sollol's CPU path keeps its KV cache in f16: every key and value
            # is rounded once as it is written, and every position (the
            # prompt's own included) reads it back from the cache.
            k, v = k.astype(np.float16).astype(np.float64), v.astype(np.float16).astype(np.float64)
        k, v = np.repeat(k, nh // nkv, axis=0), np.repeat(v, nh // nkv, axis=0)
        att = q @ k.transpose(0, 2, 1) / np.sqrt(d) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        y = linear((att @ v).transpose(1, 0, 2).reshape(seq, nh * d), L["o"])
        if gemma:
            y = rms_norm(y, L["post_attn_norm"]["weight"], hp["eps"])
        h = h + y
        x = rms_norm(h, L["ffn_norm"]["weight"], hp["eps"])
        if "router" in L:
            h = h + moe(x, L, hp["top_k"])
            continue
        g = linear(x, L["gate"])
        act = gelu_tanh(g) if gemma else g / (1 + np.exp(-g))
        y = linear(act * linear(x, L["up"]), L["down"])
        if gemma:
            y = rms_norm(y, L["post_ffn_norm"]["weight"], hp["eps"])
        h = h + y
    return linear(rms_norm(h, norm["weight"], hp["eps"]), head)


if __name__ == "__main__":
    toks = [int(t) for t in sys.argv[2].split(",")]
    print(json.dumps(forward(sys.argv[1], toks).tolist()))
