"""Causal flash attention in Triton: forward and backward, sliding window, MQA/GQA, KV-cache prefill.

    flash_attention(q, k, v, window=None)      q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D), Hq % Hkv == 0
    attention_reference(q, k, v, window=None)  the same maths in plain PyTorch (tests, CPU fallback)

Semantics. Query row r sits at absolute position i = r + (Tk - Tq): the causal diagonal is aligned to the end, so
Tq < Tk is a prefill against cached keys. Query i sees key j iff  i - W < j <= i  (W = window; None means W = Tk,
plain causal). Every query sees at least itself, so no row is empty. Query head h reads K/V head h // (Hq // Hkv).

Forward (FlashAttention-2). One program owns BLOCK_M query rows of one head, keeps them on chip and streams the
visible key blocks, with an online softmax: running row max m, running sum l, unnormalised output acc. Scores
are kept in base 2, s = (q.k) * D^-0.5 * log2(e), so exp() is a single exp2(). The program stores O = acc / l
and the row log-sum-exp lse = m + log2(l) (fp32, base 2), all the backward needs to rebuild P = exp2(s - lse).

Block skipping. A query block holds absolute positions [i0, i1]; a key block starts at j0.
  * keys some row sees:   max(0, i0 - W + 1) <= j <= i1   -> key blocks outside are never loaded;
  * keys every row sees:  i1 - W + 1 <= j <= i0           -> key blocks inside need no mask.
So the key loop runs over [lo, hi) in three stages: [lo, a) masked (the window's trailing edge), [a, b) unmasked,
[b, hi) masked (the causal diagonal). A query block loads about (W + BLOCK_M) / BLOCK_N key blocks, so the work
grows as T*W, not T^2. The dK/dV kernel mirrors this for a key block [j0, j1] (off = Tk - Tq): query rows
j0 - off <= r < j1 - off + W see some of its keys, rows j1 - off <= r < j0 - off + W see all of them.

Backward (FlashAttention-2, no atomics). delta = rowsum(dO * O) (preprocess kernel); then with P = exp2(s - lse),
dP = dO V^T and dS = P * (dP - delta):  dV = P^T dO,  dK = scale * dS^T Q,  dQ = scale * dS K.  The dK/dV
kernel owns a block of keys of one KV head and loops over the Hq / Hkv query heads of its group and over the
query blocks that see those keys, so the GQA reduction happens in registers. The dQ kernel owns a query block,
like the forward. Neither kernel materialises repeated K/V or writes the same address twice.

Tails (T not a multiple of the block) are handled by masked loads: padded query rows load q = dO = 0 and
lse = +inf, so they contribute exactly zero to dK and dV; padded keys are excluded by the causal mask.
"""
import math
import os

import torch
import triton
import triton.language as tl

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634
_INTERPRETER_FIXES = tl.constexpr(_INTERPRET)  # see _dot and _to
_PRE_BLOCK = 16 if _INTERPRET else 128  # rows per program of the delta preprocess kernel


def _autotune(shapes):
    """triton.autotune over `shapes` (below). The key is the head dim (Triton adds the dtypes) and power-of-two
    buckets of Tq and of the visible key span, so a KV cache that grows by one token per step does not retune on
    every call. The interpreter gets one 16 x 16 config: tuning there is slow, and small blocks let small test
    shapes span several blocks and ragged tails."""
    key = ["HEAD_DIM", "TUNE_TQ", "TUNE_SPAN"]
    if _INTERPRET:
        return triton.autotune([triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)], key=key)
    max_head_dim = {(m, n, w, s): d for m, n, w, s, d in shapes}

    def fits(configs, named_args, **kwargs):
        return [c for c in configs if kwargs["HEAD_DIM"] <= max_head_dim[
            c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages]]
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s, _ in shapes]
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": fits})


# (BLOCK_M, BLOCK_N, num_warps, num_stages, largest head dim). `python -m kernels.check_compile` compiles each of
# them for sm_90a as the model calls them and prints shared memory (an H100 block may use 227 KB), registers and
# spills. At D = 128 registers are the limit (dK/dV holds two fp32 BLOCK_N x D accumulators): each list keeps at
# least one config that does not spill next to larger tiles that spill up to 136 B per thread (bench/RESULTS.md),
# and the autotuner measures which is faster. Configs that spill more (250-520 B) at D = 128 are tried at D <= 64
# only. fp32 inputs double every tile: some configs then exceed shared memory and the autotuner drops them
# (OutOfResources), and the rest spill; fp32 is a correctness path, not a fast one.
_FWD_SHAPES = [(128, 64, 8, 2, 128), (128, 64, 8, 3, 128), (128, 32, 8, 4, 128), (64, 64, 4, 3, 128),
               (64, 128, 8, 3, 128), (128, 64, 4, 3, 64)]
_DQ_SHAPES = [(128, 64, 8, 3, 128), (128, 32, 8, 4, 128), (64, 64, 8, 3, 128), (64, 128, 8, 2, 128),
              (64, 64, 4, 3, 128)]
_DKDV_SHAPES = [(16, 128, 8, 2, 128), (16, 128, 8, 3, 128), (32, 128, 8, 2, 128), (32, 64, 8, 3, 128),
                (32, 128, 8, 3, 64), (64, 128, 8, 2, 64)]


@triton.jit
def _dot(a, b, acc):
    """a @ b (+ acc), accumulated in fp32. fp32 inputs get fp32 products ("ieee"), not TF32, so that path stays
    accurate; bf16 / fp16 ignore the option. The interpreter multiplies bf16 bit patterns as integers
    (triton-lang/triton#11584), so there the operands are widened first: bf16 * bf16 is exact in fp32 anyway."""
    if _INTERPRETER_FIXES:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _to(x, dtype: tl.constexpr):
    """fp32 x rounded to `dtype`, to nearest even as on the GPU. The interpreter truncates fp32 -> bf16, which
    would double the bf16 error the tests measure, so there it rounds on the bits (finite values only)."""
    if _INTERPRETER_FIXES and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def _key_ranges(start_m, Tq, off, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key-block bounds for query rows [start_m, start_m + BLOCK_M): mask [lo, a) and [b, hi), not [a, b)."""
    i0 = start_m + off  # absolute position of the first query row
    i1 = tl.minimum(start_m + BLOCK_M, Tq) - 1 + off  # ... and of the last real one (i1 <= Tk - 1)
    lo = tl.maximum(i0 - window + 1, 0) // BLOCK_N * BLOCK_N
    hi = i1 + 1
    a = tl.cdiv(tl.maximum(i1 - window + 1, 0), BLOCK_N) * BLOCK_N  # first block inside every row's window
    b = (i0 + 1) // BLOCK_N * BLOCK_N  # blocks ending at or before i0 are causally visible to every row
    a = tl.minimum(tl.maximum(a, lo), hi)
    b = tl.minimum(tl.maximum(b, a), hi)
    return lo, a, b, hi


@triton.jit
def _query_ranges(start_n, Tq, Tk, off, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query-block bounds for keys [start_n, start_n + BLOCK_N): mask [lo, a) and [c, hi), not [a, c)."""
    j0 = start_n
    j1 = tl.minimum(start_n + BLOCK_N, Tk) - 1  # last real key
    lo = tl.maximum(j0 - off, 0) // BLOCK_M * BLOCK_M
    hi = tl.minimum(j1 - off + window, Tq)  # may be <= lo: no query sees these keys, dK = dV = 0
    a = tl.cdiv(tl.maximum(j1 - off, 0), BLOCK_M) * BLOCK_M  # first block whose rows all see key j1
    c = tl.maximum(j0 - off + window, 0) // BLOCK_M * BLOCK_M  # blocks ending before this still see key j0
    a = tl.minimum(tl.maximum(a, lo), hi)
    c = tl.minimum(tl.maximum(c, a), hi)
    return lo, a, c, hi


@triton.jit
def _visible(pos_q, pos_k, window):
    """(len(pos_q), len(pos_k)) mask: query at absolute position i sees key j iff i - window < j <= i."""
    return (pos_k[None, :] <= pos_q[:, None]) & (pos_k[None, :] > pos_q[:, None] - window)


@triton.jit
def _load_kv(K, V, stride_kt, stride_kd, stride_vt, stride_vd, offs_n, offs_d, Tk):
    """The (BLOCK_N, D) tiles of K and V at key rows offs_n; rows past Tk read as 0 (the forward and dQ loops)."""
    in_bounds = offs_n[:, None] < Tk
    k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=in_bounds, other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=in_bounds, other=0.0)
    return k, v


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_kd, stride_vt, stride_vd, pos_q, start, end, Tk, window,
               qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in tl.range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = _load_kv(K, V, stride_kt, stride_kd, stride_vt, stride_vd, offs_n, offs_d, Tk)
        s = _dot(q, tl.trans(k), None) * qk_scale  # (BLOCK_M, BLOCK_N), base 2
        if MASKED:  # also removes padded keys: for real rows j >= Tk > i
            s = tl.where(_visible(pos_q, offs_n, window), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: p = 0, not NaN
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _dot(_to(p, v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@_autotune(_FWD_SHAPES)
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
                stride_vb, stride_vh, stride_vt, stride_vd, stride_ob, stride_oh, stride_ot, stride_od,
                Hq, Tq, Tk, group, window, qk_scale, TUNE_TQ, TUNE_SPAN,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Last query block first: with causal masking it has the most keys, so the longest programs start earliest.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // Hq, bh % Hq
    h_kv = h // group
    off = Tk - Tq
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    K += b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh
    O += b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    LSE += bh.to(tl.int64) * Tq

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Tq
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    pos_q = offs_m + off
    lo, a, b2, hi = _key_ranges(start_m, Tq, off, window, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_kd, stride_vt, stride_vd, pos_q, lo, a,
                               Tk, window, qk_scale, HEAD_DIM, BLOCK_N, True)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_kd, stride_vt, stride_vd, pos_q, a, b2,
                               Tk, window, qk_scale, HEAD_DIM, BLOCK_N, False)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_kd, stride_vt, stride_vd, pos_q, b2, hi,
                               Tk, window, qk_scale, HEAD_DIM, BLOCK_N, True)

    empty = l_i == 0.0  # only padding rows: a real row sees itself. Guarded so nothing can become NaN
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))  # +inf makes the backward's P exactly 0
    tl.store(O + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od, _to(o, O.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_preprocess(O, DO, Delta, stride_ob, stride_oh, stride_ot, stride_od, stride_db, stride_dh, stride_dt,
                    stride_dd, Hq, Tq, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[r] = sum_d dO[r, d] * O[r, d], the row term of dS = P * (dP - delta)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b, h = bh // Hq, bh % Hq
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m[:, None] < Tq
    O += b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    DO += b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh
    o = tl.load(O + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od, mask=row_ok, other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dt + offs_d[None, :] * stride_dd, mask=row_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh.to(tl.int64) * Tq + offs_m, delta, mask=offs_m < Tq)


@triton.jit
def _dkdv_inner(dk, dv, k, v, Q, DO, LSE, Delta, stride_qt, stride_qd, stride_dt, stride_dd, offs_n, start, end,
                Tq, off, window, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in tl.range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Tq
        q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + offs_m[:, None] * stride_dt + offs_d[None, :] * stride_dd, mask=row_ok[:, None],
                     other=0.0)
        lse = tl.load(LSE + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + offs_m, mask=row_ok, other=0.0)
        # Work in the transposed (key, query) frame so that dK and dV come out without transposing them.
        p_t = tl.math.exp2(_dot(k, tl.trans(q), None) * qk_scale - lse[None, :])
        if MASKED:
            p_t = tl.where(tl.trans(_visible(offs_m + off, offs_n, window)), p_t, 0.0)
        dv = _dot(_to(p_t, do.dtype), do, dv)
        dp_t = _dot(v, tl.trans(do), None)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _dot(_to(ds_t, q.dtype), q, dk)
    return dk, dv


@_autotune(_DKDV_SHAPES)
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, Delta, DK, DV,
                     stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
                     stride_vb, stride_vh, stride_vt, stride_vd, stride_db, stride_dh, stride_dt, stride_dd,
                     stride_dkb, stride_dkh, stride_dkt, stride_dkd, stride_dvb, stride_dvh, stride_dvt, stride_dvd,
                     Hq, Hkv, Tq, Tk, group, window, sm_scale, qk_scale, TUNE_TQ, TUNE_SPAN,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bh_kv = tl.program_id(1)
    b, h_kv = bh_kv // Hkv, bh_kv % Hkv
    off = Tk - Tq
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n[:, None] < Tk
    K += b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh
    k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=key_ok, other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=key_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    lo, a, c, hi = _query_ranges(start_n, Tq, Tk, off, window, BLOCK_M, BLOCK_N)
    for g in range(group):  # the query heads sharing this KV head: the GQA reduction stays in registers
        h = h_kv * group + g
        Qh = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        DOh = DO + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh
        LSEh = LSE + (b * Hq + h).to(tl.int64) * Tq
        Dh = Delta + (b * Hq + h).to(tl.int64) * Tq
        dk, dv = _dkdv_inner(dk, dv, k, v, Qh, DOh, LSEh, Dh, stride_qt, stride_qd, stride_dt, stride_dd, offs_n,
                             lo, a, Tq, off, window, qk_scale, HEAD_DIM, BLOCK_M, True)
        dk, dv = _dkdv_inner(dk, dv, k, v, Qh, DOh, LSEh, Dh, stride_qt, stride_qd, stride_dt, stride_dd, offs_n,
                             a, c, Tq, off, window, qk_scale, HEAD_DIM, BLOCK_M, False)
        dk, dv = _dkdv_inner(dk, dv, k, v, Qh, DOh, LSEh, Dh, stride_qt, stride_qd, stride_dt, stride_dd, offs_n,
                             c, hi, Tq, off, window, qk_scale, HEAD_DIM, BLOCK_M, True)

    DK += b.to(tl.int64) * stride_dkb + h_kv.to(tl.int64) * stride_dkh
    DV += b.to(tl.int64) * stride_dvb + h_kv.to(tl.int64) * stride_dvh
    dk = _to(dk * sm_scale, DK.dtype.element_ty)
    tl.store(DK + offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd, dk, mask=key_ok)
    dv = _to(dv, DV.dtype.element_ty)
    tl.store(DV + offs_n[:, None] * stride_dvt + offs_d[None, :] * stride_dvd, dv, mask=key_ok)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd, pos_q, start, end, Tk,
              window, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in tl.range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = _load_kv(K, V, stride_kt, stride_kd, stride_vt, stride_vd, offs_n, offs_d, Tk)
        p = tl.math.exp2(_dot(q, tl.trans(k), None) * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(_visible(pos_q, offs_n, window), p, 0.0)
        dp = _dot(do, tl.trans(v), None)
        ds = p * (dp - delta[:, None])
        dq = _dot(_to(ds, k.dtype), k, dq)
    return dq


@_autotune(_DQ_SHAPES)
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, Delta, DQ,
                   stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
                   stride_vb, stride_vh, stride_vt, stride_vd, stride_db, stride_dh, stride_dt, stride_dd,
                   stride_dqb, stride_dqh, stride_dqt, stride_dqd,
                   Hq, Tq, Tk, group, window, sm_scale, qk_scale, TUNE_TQ, TUNE_SPAN,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # longest query blocks first, as forward
    bh = tl.program_id(1)
    b, h = bh // Hq, bh % Hq
    h_kv = h // group
    off = Tk - Tq
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Tq
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    DO += b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh
    K += b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dt + offs_d[None, :] * stride_dd, mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * Tq + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + bh.to(tl.int64) * Tq + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    pos_q = offs_m + off
    lo, a, b2, hi = _key_ranges(start_m, Tq, off, window, BLOCK_M, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd, pos_q, lo, a, Tk,
                   window, qk_scale, HEAD_DIM, BLOCK_N, True)
    dq = _dq_inner(dq, q, do, lse, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd, pos_q, a, b2, Tk,
                   window, qk_scale, HEAD_DIM, BLOCK_N, False)
    dq = _dq_inner(dq, q, do, lse, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd, pos_q, b2, hi, Tk,
                   window, qk_scale, HEAD_DIM, BLOCK_N, True)

    DQ += b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
    dq = _to(dq * sm_scale, DQ.dtype.element_ty)
    tl.store(DQ + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd, dq, mask=row_ok[:, None])


def _check_inputs(q, k, v, window, for_kernel):
    """Shapes (B, Hq, Tq, D) and (B, Hkv, Tk, D); for_kernel adds the dtype, head dim and device of the kernel."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, time, head_dim), got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    (B, Hq, Tq, D), (Bk, Hkv, Tk, Dk) = q.shape, k.shape
    if B != Bk:
        raise ValueError(f"q has batch size {B} but k/v have {Bk}; pass the same batch to all three")
    if D != Dk:
        raise ValueError(f"q has head dim {D} but k/v have {Dk}; they must match")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q has {Hq} heads, not a multiple of the {Hkv} K/V heads; use Hq = group * Hkv "
                         "(MQA: Hkv = 1)")
    if Tq > Tk:
        raise ValueError(f"q has {Tq} positions but k/v only {Tk}; the queries must be the last Tq of the Tk "
                         "key positions")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or an int >= 1 (a query at i sees keys in (i - window, i]), "
                         f"got {window!r}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices ({q.device}, {k.device}, {v.device}); move them to one")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v have different dtypes ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one")
    if not for_kernel:
        return
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype {q.dtype} not supported; use bfloat16, float16 or float32 (or attention_reference)")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {D} not supported; use one of {SUPPORTED_HEAD_DIMS} (pad the head dim, "
                         "or use attention_reference)")
    if q.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"flash_attention needs CUDA tensors (got {q.device}); set TRITON_INTERPRET=1 before "
                         "importing triton to run it on CPU, or use attention_reference")


def _tune_args(Tq, Tk, window):
    return triton.next_power_of_2(Tq), triton.next_power_of_2(min(window, Tk))


def _forward_outputs(q):
    """Empty O and LSE for q (B, Hq, Tq, D): also the forward op's fake version, so the layouts cannot drift apart."""
    B, Hq, Tq, D = q.shape
    # O is laid out (B, Tq, Hq, D) in memory: the caller's y.transpose(1, 2).reshape(B, Tq, Hq * D) is then a view.
    return q.new_empty(B, Tq, Hq, D).transpose(1, 2), q.new_empty(B, Hq, Tq, dtype=torch.float32)


def _forward(q, k, v, window):
    (B, Hq, Tq, D), Hkv, Tk = q.shape, k.shape[1], k.shape[2]
    o, lse = _forward_outputs(q)
    grid = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * Hq)  # noqa: E731
    _fwd_kernel[grid](q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                      Hq, Tq, Tk, Hq // Hkv, window, D ** -0.5 * _LOG2E, *_tune_args(Tq, Tk, window), HEAD_DIM=D)
    return o, lse


def _backward(q, k, v, o, lse, do, window, need_dq, need_dkdv):
    (B, Hq, Tq, D), Hkv, Tk = q.shape, k.shape[1], k.shape[2]
    sm_scale, tune = D ** -0.5, _tune_args(Tq, Tk, window)
    delta = torch.empty_like(lse)
    _bwd_preprocess[(triton.cdiv(Tq, _PRE_BLOCK), B * Hq)](o, do, delta, *o.stride(), *do.stride(), Hq, Tq,
                                                          HEAD_DIM=D, BLOCK_M=_PRE_BLOCK)
    dq = dk = dv = None
    if need_dkdv:
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        grid = lambda meta: (triton.cdiv(Tk, meta["BLOCK_N"]), B * Hkv)  # noqa: E731
        _bwd_dkdv_kernel[grid](q, k, v, do, lse, delta, dk, dv, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
                               *dk.stride(), *dv.stride(), Hq, Hkv, Tq, Tk, Hq // Hkv, window, sm_scale,
                               sm_scale * _LOG2E, *tune, HEAD_DIM=D)
    if need_dq:
        dq = torch.empty_like(q)
        grid = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * Hq)  # noqa: E731
        _bwd_dq_kernel[grid](q, k, v, do, lse, delta, dq, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
                             *dq.stride(), Hq, Tq, Tk, Hq // Hkv, window, sm_scale, sm_scale * _LOG2E, *tune,
                             HEAD_DIM=D)
    return dq, dk, dv


# Custom ops: torch.compile sees each kernel launch as one opaque node with a fake (shape-only) version, instead of
# tracing into Triton's launcher. A gradient that is not needed comes back as an empty tensor (ops return tensors).
@torch.library.custom_op("nanogpt_attention::forward", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, window)


@_forward_op.register_fake
def _(q, k, v, window):
    return _forward_outputs(q)


@torch.library.custom_op("nanogpt_attention::backward", mutates_args=())
def _backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                 do: torch.Tensor, window: int, need_dq: bool, need_dkdv: bool) -> list[torch.Tensor]:
    grads = _backward(q, k, v, o, lse, do, window, need_dq, need_dkdv)
    return [q.new_empty(0) if g is None else g for g in grads]  # outputs may not alias: one empty each


@_backward_op.register_fake
def _(q, k, v, o, lse, do, window, need_dq, need_dkdv):
    return [torch.empty_like(t) if need else q.new_empty(0) for t, need in ((q, need_dq), (k, need_dkdv),
                                                                              (v, need_dkdv))]


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window):
        o, lse = _forward_op(q, k, v, window)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.window = window
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        need_dq, need_dk, need_dv = ctx.needs_input_grad[:3]
        dq, dk, dv = _backward_op(q, k, v, o, lse, do, ctx.window, need_dq, need_dk or need_dv)
        return dq if need_dq else None, dk if need_dk else None, dv if need_dv else None, None


def flash_attention(q, k, v, window=None):
    """Causal attention of q (B, Hq, Tq, D) over k, v (B, Hkv, Tk, D), Hq a multiple of Hkv. Query row r sits at
    position i = r + Tk - Tq and sees the keys j with i - window < j <= i (window=None: every j <= i). Inputs may
    have any strides; bf16 or fp16 (fp32 works, slowly); D in SUPPORTED_HEAD_DIMS. Differentiable in q, k, v
    (Tq < Tk included). The result is a (B, Hq, Tq, D) view of a (B, Tq, Hq, D) buffer."""
    _check_inputs(q, k, v, window, for_kernel=True)
    Tk = k.size(2)
    window = Tk if window is None else min(window, Tk)  # a window of Tk keys or more is plain causal attention
    return _FlashAttention.apply(q, k, v, window)


def attention_reference(q, k, v, window=None):
    """Plain PyTorch version of flash_attention: same shapes and semantics, any float dtype, any device. Computes in
    at least fp32 and returns q's dtype. Materialises the (Tq, Tk) scores and the repeated K/V heads."""
    _check_inputs(q, k, v, window, for_kernel=False)
    Tq, Tk, group = q.size(2), k.size(2), q.size(1) // k.size(1)
    dtype = torch.promote_types(q.dtype, torch.float32)
    k = k.to(dtype).repeat_interleave(group, dim=1)  # query head h reads K/V head h // group
    v = v.to(dtype).repeat_interleave(group, dim=1)
    i = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]  # absolute query positions
    j = torch.arange(Tk, device=q.device)[None, :]
    visible = j <= i
    if window is not None:
        visible &= j > i - window
    scores = (q.to(dtype) @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return (probs @ v).to(q.dtype)
