"""Causal flash attention in Triton: forward and backward, sliding window, MQA/GQA, KV-cache prefill and decode.

    flash_attention(q, k, v, window=None, deterministic=False)   q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D)
    flash_decode(q, k, v, window=None)                           one new query per sequence (Tq = 1) over a cache
    attention_reference(q, k, v, window=None)                    the same maths in plain PyTorch (tests, CPU)

Semantics. Query row r sits at absolute position i = r + (Tk - Tq): the causal diagonal is aligned to the end, so
Tq < Tk is a prefill against cached keys. Query i sees key j iff  i - W < j <= i  (W = window; None means W = Tk,
plain causal). Every query sees at least itself, so no row is empty. Hq is a multiple of Hkv: query head h reads
K/V head h // q_per_kv, q_per_kv = Hq // Hkv.

Forward (FlashAttention-2). One program owns BLOCK_M query rows of one head, keeps them on chip and streams the
visible key blocks, with an online softmax: running row max m, running sum l, unnormalised output acc. Scores
are kept in base 2, s = (q.k) * D^-0.5 * log2(e), so exp() is a single exp2() and s - m one fused multiply-add.
The program stores O = acc / l and the row log-sum-exp lse = m + log2(l) (fp32, base 2), all the backward needs
to rebuild P = exp2(s - lse).

Loads. On Hopper (and in the interpreter) each program builds TMA descriptors over its head's (T, D) rows, so
the copy engine moves the tiles, rows past T read as zero and no address arithmetic sits in registers; inputs
whose rows are not 16-byte aligned, or whose D is strided, take plain masked loads (TMA_LOADS = False forces them).
Row offsets are 64-bit: T * stride_t may pass 2^31 (long contexts in the (B, T, H, D) layout).

Block skipping. A query block holds absolute positions [i0, i1]; a key block starts at j0.
  * keys some row sees:   max(0, i0 - W + 1) <= j <= i1   -> key blocks outside are never loaded;
  * keys every row sees:  i1 - W + 1 <= j <= i0           -> key blocks inside need no mask.
So the key loop runs over [lo, hi) in three stages: [lo, full_lo) masked (the window's trailing edge),
[full_lo, full_hi) unmasked (and loaded without bounds checks), [full_hi, hi) masked (the causal diagonal). A query
block loads about (W + BLOCK_M) / BLOCK_N key blocks, so the work grows as T*W, not T^2. The dK/dV kernel mirrors
this for a key block [j0, j1] (off = Tk - Tq): query rows j0 - off <= r < j1 - off + W see some of its keys, rows
j1 - off <= r < j0 - off + W see all of them.

Backward (FlashAttention-2). delta = rowsum(dO * O) (preprocess kernel); then with P = exp2(s - lse),
dP = dO V^T and dS = P * (dP - delta):  dV = P^T dO,  dK = scale * dS^T Q,  dQ = scale * dS K.  The dK/dV
kernel owns a block of keys of one K/V head and loops over query heads of its group and over the query blocks
that see those keys, so the GQA reduction happens in registers without repeating K/V. When the grid would leave
SMs idle (MQA: one K/V head), `split` programs share a K/V block, each taking every split-th query head of the
group, and their fp32 partial dK/dV are summed after (a fixed order: deterministic). dQ comes either from the
same kernel, added in fp32 with atomics (5 GEMMs per block; the default at D <= 64), or from a separate dQ kernel
that owns a query block like the forward (7 GEMMs, no atomics, bitwise reproducible: deterministic=True, and
always at D = 128, where the dK/dV kernel has no registers left for it).

Decode (flash-decoding). For Tq = 1 the query heads of one K/V group are the rows of one tile, so a K/V block is
read once for all of them (MQA with 32 heads: 32 rows per load), and the keys are split across programs that each
write a partial output and log-sum-exp; a second kernel merges the splits.

Tails (T not a multiple of the block) are handled by masked (or TMA zero-filled) loads: padded query rows load
q = dO = 0 and lse = +inf, so they contribute exactly zero to dK and dV; padded keys are excluded by the causal
mask.
"""
import math
import os

import torch
import triton
import triton.language as tl

from nanokernels.mask import attention_mask  # the visibility rule, written once

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
TMA_LOADS = True  # False: plain loads everywhere (the tests compare both paths)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634
_INTERPRETER_FIXES = tl.constexpr(_INTERPRET)  # see _dot and _to
_PRE_BLOCK = 16 if _INTERPRET else 128  # rows per program of the delta preprocess kernel
_SPLIT_BLOCK = 128  # the key-block size the backward split and the decode splits plan with
_DECODE_GRANULE = 16 if _INTERPRET else 128  # keys per decode split are a multiple of this (every BLOCK_N divides it)
_MAX_DECODE_SPLITS = 64


def _autotune(shapes, key=("HEAD_DIM", "USE_TMA", "TUNE_TQ", "TUNE_SPAN"), reset_to_zero=None):
    """triton.autotune over `shapes` (below). The key is the head dim, the load path (Triton adds the dtypes) and
    power-of-two buckets of Tq and of the visible key span, so a KV cache that grows by one token per step does not
    retune on every call. The interpreter gets one 16 x 16 config: tuning there is slow, and small blocks let small
    test shapes span several blocks and ragged tails. reset_to_zero: outputs a kernel adds into (atomics), zeroed
    before each timed run of the tuning and again before the real one, which would otherwise add onto them."""
    if _INTERPRET:
        return triton.autotune([triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)],
                               key=list(key), reset_to_zero=reset_to_zero)
    largest = {(m, n, w, s): (d, d_plain) for m, n, w, s, d, d_plain in shapes}

    def fits(configs, named_args, **kwargs):
        """Configs that compile without spilling at this head dim (nanokernels/check_compile.py). fp32 (a correctness
        path, no wgmma) keeps those of at most 128 x 64 tiles: larger ones cannot fit its shared memory."""
        if named_args["Q"].dtype == torch.float32:
            return [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 64]
        path = 0 if kwargs["USE_TMA"] else 1
        return [c for c in configs if kwargs["HEAD_DIM"] <= largest[
            c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages][path]]
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s, _, _ in shapes]
    return triton.autotune(configs, key=list(key), prune_configs_by={"early_config_prune": fits},
                           reset_to_zero=reset_to_zero)


# (BLOCK_M, BLOCK_N, num_warps, num_stages, largest head dim with TMA loads, ... with plain loads). A config is tried
# only at head dims where `python -m nanokernels.check_compile` finds it spill-free for bf16 / fp16 on sm_90a with both
# Triton 3.9 and 3.6 (the GPU image's), the dK/dV kernel with and without the atomic dQ at D <= 64, and at D = 128
# none whose wgmma are narrower than N = 64 when a wider one is spill-free (bench/RESULTS.md, "Kernels v2"). At
# D = 128 the dK/dV kernel holds two 128 x 128 fp32 accumulators and has no spill-free config with BLOCK_M >= 64,
# TMA or not, nor any with the atomic dQ (hence _ATOMIC_DQ_MAX_HEAD_DIM); with Triton 3.6 BLOCK_M = 64 spills at
# every head dim. fp32 tries every config up to 128 x 64 tiles: those over the shared memory limit are dropped by
# the autotuner.
_FWD_SHAPES = [(128, 128, 8, 3, 128, 64), (128, 64, 8, 2, 128, 128), (128, 64, 8, 3, 128, 128),
               (128, 32, 8, 4, 64, 64), (64, 64, 4, 3, 128, 128), (64, 128, 8, 3, 128, 128),
               (128, 64, 4, 3, 64, 64)]
_DQ_SHAPES = [(128, 64, 8, 3, 128, 128), (128, 32, 8, 4, 64, 64), (64, 64, 8, 3, 64, 64),
              (64, 128, 8, 2, 128, 64), (64, 64, 4, 3, 128, 128), (128, 128, 8, 2, 128, 64)]
_DKDV_SHAPES = [(16, 128, 8, 2, 64, 128), (16, 128, 8, 3, 64, 64), (32, 128, 8, 2, 64, 64), (32, 64, 8, 3, 128, 32),
                (32, 128, 8, 3, 64, 32), (16, 64, 4, 3, 64, 32)]
_ATOMIC_DQ_MAX_HEAD_DIM = 64  # above it dQ comes from its own kernel, deterministic or not


def _decode_autotune():
    """Decode configs (BLOCK_N, num_warps, num_stages); the rows are the group's query heads, so BLOCK_H is fixed by
    the call. Keyed on the head dim, the rows and a power-of-two bucket of the keys per split."""
    key = ["HEAD_DIM", "BLOCK_H", "TUNE_KEYS"]
    if _INTERPRET:
        return triton.autotune([triton.Config({"BLOCK_N": 16}, num_warps=1, num_stages=1)], key=key)
    return triton.autotune([triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
                            for n, w, s in ((64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 3))], key=key)


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
    """Key-block bounds (lo, full_lo, full_hi, hi) for query rows [start_m, start_m + BLOCK_M): every row sees
    every key of [full_lo, full_hi); [lo, full_lo) and [full_hi, hi) need the mask."""
    i0 = start_m + off  # absolute position of the first query row
    i1 = tl.minimum(start_m + BLOCK_M, Tq) - 1 + off  # ... and of the last real one (i1 <= Tk - 1)
    lo = tl.maximum(i0 - window + 1, 0) // BLOCK_N * BLOCK_N
    hi = i1 + 1
    full_lo = tl.cdiv(tl.maximum(i1 - window + 1, 0), BLOCK_N) * BLOCK_N  # first block inside every row's window
    full_hi = (i0 + 1) // BLOCK_N * BLOCK_N  # blocks ending at or before i0 are causally visible to every row
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_ranges(start_n, Tq, Tk, off, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query-block bounds (lo, full_lo, full_hi, hi) for keys [start_n, start_n + BLOCK_N): every row of
    [full_lo, full_hi) sees every key; [lo, full_lo) and [full_hi, hi) need the mask."""
    j0 = start_n
    j1 = tl.minimum(start_n + BLOCK_N, Tk) - 1  # last real key
    lo = tl.maximum(j0 - off, 0) // BLOCK_M * BLOCK_M
    hi = tl.minimum(j1 - off + window, Tq)  # may be <= lo: no query sees these keys, dK = dV = 0
    full_lo = tl.cdiv(tl.maximum(j1 - off, 0), BLOCK_M) * BLOCK_M  # first block whose rows all see key j1
    full_hi = tl.maximum(j0 - off + window, 0) // BLOCK_M * BLOCK_M  # blocks ending before this still see key j0
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _visible(pos_q, pos_k, window):
    """(len(pos_q), len(pos_k)) mask: query at absolute position i sees key j iff i - window < j <= i."""
    return (pos_k[None, :] <= pos_q[:, None]) & (pos_k[None, :] > pos_q[:, None] - window)


@triton.jit
def _row_source(base, T, stride_t, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr):
    """What _load_rows reads (ROWS, HEAD_DIM) tiles of one head's (T, HEAD_DIM) rows at `base` from: a TMA
    descriptor (rows past T read as 0) or the pointer itself."""
    if USE_TMA:
        return tl.make_tensor_descriptor(base, shape=[T, HEAD_DIM], strides=[stride_t, 1],
                                         block_shape=[ROWS, HEAD_DIM])
    else:
        return base


@triton.jit
def _load_rows(source, start, T, stride_t, stride_d, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
               USE_TMA: tl.constexpr, MASKED: tl.constexpr):
    """Rows [start, start + ROWS) of a head; rows past T read as 0. MASKED=False: the caller knows they are < T."""
    if USE_TMA:
        return source.load([start, 0])
    else:
        rows = start + tl.arange(0, ROWS)
        ptrs = source + rows[:, None].to(tl.int64) * stride_t + tl.arange(0, HEAD_DIM)[None, :] * stride_d
        if MASKED:
            return tl.load(ptrs, mask=rows[:, None] < T, other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def _store_rows(base, x, start, T, stride_t, stride_d, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """fp32 x (ROWS, HEAD_DIM) rounded to base's dtype into rows [start, start + ROWS) of a head, those < T."""
    rows = start + tl.arange(0, ROWS)
    ptrs = base + rows[:, None].to(tl.int64) * stride_t + tl.arange(0, HEAD_DIM)[None, :] * stride_d
    tl.store(ptrs, _to(x, base.dtype.element_ty), mask=rows[:, None] < T)


@triton.jit
def _online_softmax(acc, l_i, m_i, qk, v, qk_scale):
    """Fold one key block into the running (acc, l, m): qk are raw scores (masked ones -inf), v the block's values."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # qk_scale > 0: the max commutes with the scaling
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: p = 0, not NaN
    p = tl.math.exp2(qk * qk_scale - m_ref[:, None])  # one fused multiply-add per score
    alpha = tl.math.exp2(m_i - m_ref)  # rescales what was accumulated under the old max
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _dot(_to(p, v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_kd, stride_vt, stride_vd, pos_q, start, end, Tk,
               window, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               USE_TMA: tl.constexpr):
    for start_n in tl.range(start, end, BLOCK_N):
        k = _load_rows(k_src, start_n, Tk, stride_kt, stride_kd, BLOCK_N, HEAD_DIM, USE_TMA, MASKED)
        v = _load_rows(v_src, start_n, Tk, stride_vt, stride_vd, BLOCK_N, HEAD_DIM, USE_TMA, MASKED)
        qk = _dot(q, tl.trans(k), None)  # (BLOCK_M, BLOCK_N)
        if MASKED:  # also removes padded keys: for real rows j >= Tk > i
            qk = tl.where(_visible(pos_q, start_n + tl.arange(0, BLOCK_N), window), qk, float("-inf"))
        acc, l_i, m_i = _online_softmax(acc, l_i, m_i, qk, v, qk_scale)
    return acc, l_i, m_i


@_autotune(_FWD_SHAPES)
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
                stride_vb, stride_vh, stride_vt, stride_vd, stride_ob, stride_oh, stride_ot, stride_od,
                Hq, Tq, Tk, q_per_kv, window, qk_scale, TUNE_TQ, TUNE_SPAN,
                HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Last query block first: with causal masking it has the most keys, so the longest programs start earliest.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // Hq, bh % Hq
    h_kv = h // q_per_kv
    off = Tk - Tq
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    K += b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh
    O += b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    LSE += bh.to(tl.int64) * Tq

    q_src = _row_source(Q, Tq, stride_qt, BLOCK_M, HEAD_DIM, USE_TMA)
    q = _load_rows(q_src, start_m, Tq, stride_qt, stride_qd, BLOCK_M, HEAD_DIM, USE_TMA, True)
    k_src = _row_source(K, Tk, stride_kt, BLOCK_N, HEAD_DIM, USE_TMA)
    v_src = _row_source(V, Tk, stride_vt, BLOCK_N, HEAD_DIM, USE_TMA)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    pos_q = offs_m + off
    lo, full_lo, full_hi, hi = _key_ranges(start_m, Tq, off, window, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_kd, stride_vt, stride_vd, pos_q,
                               lo, full_lo, Tk, window, qk_scale, HEAD_DIM, BLOCK_N, True, USE_TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_kd, stride_vt, stride_vd, pos_q,
                               full_lo, full_hi, Tk, window, qk_scale, HEAD_DIM, BLOCK_N, False, USE_TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_kd, stride_vt, stride_vd, pos_q,
                               full_hi, hi, Tk, window, qk_scale, HEAD_DIM, BLOCK_N, True, USE_TMA)

    empty = l_i == 0.0  # only padding rows: a real row sees itself. Guarded so nothing can become NaN
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))  # +inf makes the backward's P exactly 0
    _store_rows(O, acc / l_safe[:, None], start_m, Tq, stride_ot, stride_od, BLOCK_M, HEAD_DIM)
    tl.store(LSE + offs_m, lse, mask=offs_m < Tq)


@triton.jit
def _bwd_preprocess(O, DO, Delta, stride_ob, stride_oh, stride_ot, stride_od, stride_db, stride_dh, stride_dt,
                    stride_dd, Hq, Tq, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[r] = sum_d dO[r, d] * O[r, d], the row term of dS = P * (dP - delta)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // Hq, bh % Hq
    O += b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    DO += b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh
    o = _load_rows(O, start_m, Tq, stride_ot, stride_od, BLOCK_M, HEAD_DIM, False, True)
    do = _load_rows(DO, start_m, Tq, stride_dt, stride_dd, BLOCK_M, HEAD_DIM, False, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    tl.store(Delta + bh.to(tl.int64) * Tq + offs_m, delta, mask=offs_m < Tq)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_src, do_src, LSE, Delta, DQ, stride_qt, stride_qd, stride_dt, stride_dd, stride_dqt,
                stride_dqd, offs_n, start, end, Tq, off, window, sm_scale, qk_scale, HEAD_DIM: tl.constexpr,
                BLOCK_M: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in tl.range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Tq
        # dK/dV's unmasked stage may hold padding rows (see _query_ranges), so these loads are always bounded
        q = _load_rows(q_src, start_m, Tq, stride_qt, stride_qd, BLOCK_M, HEAD_DIM, USE_TMA, True)
        do = _load_rows(do_src, start_m, Tq, stride_dt, stride_dd, BLOCK_M, HEAD_DIM, USE_TMA, True)
        lse = tl.load(LSE + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + offs_m, mask=row_ok, other=0.0)
        # Work in the transposed (key, query) frame so that dK and dV come out without transposing them.
        p_t = tl.math.exp2(_dot(k, tl.trans(q), None) * qk_scale - lse[None, :])
        if MASKED:
            p_t = tl.where(tl.trans(_visible(offs_m + off, offs_n, window)), p_t, 0.0)
        dv = _dot(_to(p_t, do.dtype), do, dv)
        dp_t = _dot(v, tl.trans(do), None)
        ds_t = _to(p_t * (dp_t - delta[None, :]), q.dtype)
        dk = _dot(ds_t, q, dk)
        if ATOMIC_DQ:  # this block's share of dQ = scale * dS K, added in fp32 (other key blocks add theirs)
            dq = _dot(tl.trans(ds_t), k, None) * sm_scale
            tl.atomic_add(DQ + offs_m[:, None].to(tl.int64) * stride_dqt + offs_d[None, :] * stride_dqd, dq,
                          mask=row_ok[:, None], sem="relaxed")
    return dk, dv


@_autotune(_DKDV_SHAPES, key=("HEAD_DIM", "USE_TMA", "ATOMIC_DQ", "TUNE_TQ", "TUNE_SPAN"), reset_to_zero=["DQ"])
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, Delta, DK, DV, DQ,
                     stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
                     stride_vb, stride_vh, stride_vt, stride_vd, stride_db, stride_dh, stride_dt, stride_dd,
                     stride_dks, stride_dkb, stride_dkh, stride_dkt, stride_dkd,
                     stride_dvs, stride_dvb, stride_dvh, stride_dvt, stride_dvd,
                     stride_dqb, stride_dqh, stride_dqt, stride_dqd,
                     Hq, Hkv, Tq, Tk, q_per_kv, window, sm_scale, qk_scale, TUNE_TQ, TUNE_SPAN,
                     HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (key blocks, B * Hkv, split): program (n, bh_kv, s) sums query heads s, s + split, ... of the group
    into DK[s], DV[s] (fp32 partials when split > 1, else dK and dV themselves); with ATOMIC_DQ it adds dQ too."""
    start_n = tl.program_id(0) * BLOCK_N
    bh_kv = tl.program_id(1)
    split, n_splits = tl.program_id(2), tl.num_programs(2)
    b, h_kv = bh_kv // Hkv, bh_kv % Hkv
    off = Tk - Tq
    offs_n = start_n + tl.arange(0, BLOCK_N)
    K += b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh
    k = _load_rows(_row_source(K, Tk, stride_kt, BLOCK_N, HEAD_DIM, USE_TMA), start_n, Tk, stride_kt, stride_kd,
                   BLOCK_N, HEAD_DIM, USE_TMA, True)
    v = _load_rows(_row_source(V, Tk, stride_vt, BLOCK_N, HEAD_DIM, USE_TMA), start_n, Tk, stride_vt, stride_vd,
                   BLOCK_N, HEAD_DIM, USE_TMA, True)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    lo, full_lo, full_hi, hi = _query_ranges(start_n, Tq, Tk, off, window, BLOCK_M, BLOCK_N)
    for g in range(split, q_per_kv, n_splits):  # this program's query heads of the group: reduced in registers
        h = h_kv * q_per_kv + g
        Qh = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        DOh = DO + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh
        q_src = _row_source(Qh, Tq, stride_qt, BLOCK_M, HEAD_DIM, USE_TMA)
        do_src = _row_source(DOh, Tq, stride_dt, BLOCK_M, HEAD_DIM, USE_TMA)
        LSEh = LSE + (b * Hq + h).to(tl.int64) * Tq
        Dh = Delta + (b * Hq + h).to(tl.int64) * Tq
        DQh = DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
        dk, dv = _dkdv_inner(dk, dv, k, v, q_src, do_src, LSEh, Dh, DQh, stride_qt, stride_qd, stride_dt, stride_dd,
                             stride_dqt, stride_dqd, offs_n, lo, full_lo, Tq, off, window, sm_scale, qk_scale,
                             HEAD_DIM, BLOCK_M, True, USE_TMA, ATOMIC_DQ)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_src, do_src, LSEh, Dh, DQh, stride_qt, stride_qd, stride_dt, stride_dd,
                             stride_dqt, stride_dqd, offs_n, full_lo, full_hi, Tq, off, window, sm_scale, qk_scale,
                             HEAD_DIM, BLOCK_M, False, USE_TMA, ATOMIC_DQ)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_src, do_src, LSEh, Dh, DQh, stride_qt, stride_qd, stride_dt, stride_dd,
                             stride_dqt, stride_dqd, offs_n, full_hi, hi, Tq, off, window, sm_scale, qk_scale,
                             HEAD_DIM, BLOCK_M, True, USE_TMA, ATOMIC_DQ)

    DK += split.to(tl.int64) * stride_dks + b.to(tl.int64) * stride_dkb + h_kv.to(tl.int64) * stride_dkh
    DV += split.to(tl.int64) * stride_dvs + b.to(tl.int64) * stride_dvb + h_kv.to(tl.int64) * stride_dvh
    _store_rows(DK, dk * sm_scale, start_n, Tk, stride_dkt, stride_dkd, BLOCK_N, HEAD_DIM)
    _store_rows(DV, dv, start_n, Tk, stride_dvt, stride_dvd, BLOCK_N, HEAD_DIM)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_src, v_src, stride_kt, stride_kd, stride_vt, stride_vd, pos_q, start, end, Tk,
              window, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              USE_TMA: tl.constexpr):
    for start_n in tl.range(start, end, BLOCK_N):
        k = _load_rows(k_src, start_n, Tk, stride_kt, stride_kd, BLOCK_N, HEAD_DIM, USE_TMA, MASKED)
        v = _load_rows(v_src, start_n, Tk, stride_vt, stride_vd, BLOCK_N, HEAD_DIM, USE_TMA, MASKED)
        p = tl.math.exp2(_dot(q, tl.trans(k), None) * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(_visible(pos_q, start_n + tl.arange(0, BLOCK_N), window), p, 0.0)
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
                   Hq, Tq, Tk, q_per_kv, window, sm_scale, qk_scale, TUNE_TQ, TUNE_SPAN,
                   HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # longest query blocks first, as forward
    bh = tl.program_id(1)
    b, h = bh // Hq, bh % Hq
    h_kv = h // q_per_kv
    off = Tk - Tq
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < Tq
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    DO += b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh
    K += b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh
    q = _load_rows(_row_source(Q, Tq, stride_qt, BLOCK_M, HEAD_DIM, USE_TMA), start_m, Tq, stride_qt, stride_qd,
                   BLOCK_M, HEAD_DIM, USE_TMA, True)
    do = _load_rows(_row_source(DO, Tq, stride_dt, BLOCK_M, HEAD_DIM, USE_TMA), start_m, Tq, stride_dt, stride_dd,
                    BLOCK_M, HEAD_DIM, USE_TMA, True)
    k_src = _row_source(K, Tk, stride_kt, BLOCK_N, HEAD_DIM, USE_TMA)
    v_src = _row_source(V, Tk, stride_vt, BLOCK_N, HEAD_DIM, USE_TMA)
    lse = tl.load(LSE + bh.to(tl.int64) * Tq + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + bh.to(tl.int64) * Tq + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    pos_q = offs_m + off
    lo, full_lo, full_hi, hi = _key_ranges(start_m, Tq, off, window, BLOCK_M, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse, delta, k_src, v_src, stride_kt, stride_kd, stride_vt, stride_vd, pos_q, lo,
                   full_lo, Tk, window, qk_scale, HEAD_DIM, BLOCK_N, True, USE_TMA)
    dq = _dq_inner(dq, q, do, lse, delta, k_src, v_src, stride_kt, stride_kd, stride_vt, stride_vd, pos_q, full_lo,
                   full_hi, Tk, window, qk_scale, HEAD_DIM, BLOCK_N, False, USE_TMA)
    dq = _dq_inner(dq, q, do, lse, delta, k_src, v_src, stride_kt, stride_kd, stride_vt, stride_vd, pos_q, full_hi,
                   hi, Tk, window, qk_scale, HEAD_DIM, BLOCK_N, True, USE_TMA)

    DQ += b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
    _store_rows(DQ, dq * sm_scale, start_m, Tq, stride_dqt, stride_dqd, BLOCK_M, HEAD_DIM)


@_decode_autotune()
@triton.jit
def _decode_kernel(Q, K, V, O_part, LSE_part, stride_qb, stride_qh, stride_qd, stride_kb, stride_kh, stride_kt,
                   stride_kd, stride_vb, stride_vh, stride_vt, stride_vd, Hkv, Tk, q_per_kv, key_start,
                   keys_per_split, qk_scale, TUNE_KEYS,
                   HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (splits, B * Hkv): the group's query heads (rows of the tile, padded to BLOCK_H) over the keys
    [key_start + s * keys_per_split, ... + keys_per_split) of split s; writes the normalised partial output and
    its log-sum-exp (-inf for a split without keys) per (batch, head, split)."""
    split, n_splits = tl.program_id(0), tl.num_programs(0)
    bh_kv = tl.program_id(1)
    b, h_kv = bh_kv // Hkv, bh_kv % Hkv
    rows = tl.arange(0, BLOCK_H)
    row_ok = rows < q_per_kv
    heads = h_kv * q_per_kv + rows
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + heads[:, None].to(tl.int64) * stride_qh + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)
    K += b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh
    lo = key_start + split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, Tk)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    for start_n in tl.range(lo, hi, BLOCK_N):
        k = _load_rows(K, start_n, hi, stride_kt, stride_kd, BLOCK_N, HEAD_DIM, False, True)
        v = _load_rows(V, start_n, hi, stride_vt, stride_vd, BLOCK_N, HEAD_DIM, False, True)
        qk = tl.where((start_n + tl.arange(0, BLOCK_N))[None, :] < hi, _dot(q, tl.trans(k), None), float("-inf"))
        acc, l_i, m_i = _online_softmax(acc, l_i, m_i, qk, v, qk_scale)

    empty = l_i == 0.0  # a split past the last key
    l_safe = tl.where(empty, 1.0, l_i)
    part = (b * Hkv * q_per_kv + heads).to(tl.int64) * n_splits + split  # (batch, head, split), heads of all groups
    tl.store(O_part + part[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None], mask=row_ok[:, None])
    tl.store(LSE_part + part, tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe)), mask=row_ok)


@triton.jit
def _decode_merge_kernel(O_part, LSE_part, O, stride_ob, stride_oh, stride_od, Hq, n_splits,
                         HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    """O[b, h] = sum_s w_s O_s / sum_s w_s with w_s = 2^(lse_s - max lse): the softmax over all keys, rebuilt."""
    bh = tl.program_id(0)
    b, h = bh // Hq, bh % Hq
    splits = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = splits < n_splits
    part = bh.to(tl.int64) * n_splits + splits
    lse = tl.load(LSE_part + part, mask=ok, other=float("-inf"))
    w = tl.math.exp2(lse - tl.max(lse, 0))  # some split holds the query's own key, so the max is finite
    o = tl.load(O_part + part[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0)
    out = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)
    tl.store(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_d * stride_od,
             _to(out, O.dtype.element_ty))


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
        raise ValueError(f"q has {Hq} heads, not a multiple of the {Hkv} K/V heads; use Hq = q_per_kv * Hkv "
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
        raise ValueError(f"the attention kernels need CUDA tensors (got {q.device}); set TRITON_INTERPRET=1 before "
                         "importing triton to run them on CPU, or use attention_reference")


def _tune_args(Tq, Tk, window):
    return triton.next_power_of_2(Tq), triton.next_power_of_2(min(window, Tk))


def _sm_count(device):
    """Streaming multiprocessors of a CUDA device, which the split planners fill; elsewhere 132 (an H100 / H200: the
    offline compile check, and the interpreter, where it makes small test shapes split)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def _use_tma(*tensors):
    """TMA loads: on Hopper or newer (or in the interpreter), for bf16 / fp16 (B, H, T, D) tensors with unit stride
    along D and 16-byte aligned rows and heads (the kernels build a descriptor per (batch, head)). fp32, a
    correctness path without wgmma, keeps plain loads (and compiles in a fraction of the time)."""
    if not TMA_LOADS or tensors[0].dtype == torch.float32:
        return False
    if not _INTERPRET:
        target = triton.runtime.driver.active.get_current_target()
        if target.backend != "cuda" or target.arch < 90:
            return False
    return all(t.stride(3) == 1 and t.stride(2) > 0 and t.data_ptr() % 16 == 0
               and all(s * t.element_size() % 16 == 0 for s in t.stride()[:3]) for t in tensors)


def _set_tma_allocator(device):
    """Descriptors built in a kernel need a little global memory from Triton's allocator, a per-thread setting
    (autograd runs the backward in another thread), so it is set before every launch that uses them."""
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device))


def _kv_split(B, Hkv, Tk, q_per_kv, device):
    """Programs per K/V block in the dK/dV kernel: enough for two per SM (MQA has one K/V head), at most one per
    query head of the group."""
    programs = triton.cdiv(Tk, _SPLIT_BLOCK) * B * Hkv
    return max(1, min(q_per_kv, triton.cdiv(2 * _sm_count(device), programs)))


def _decode_splits(programs, keys, device):
    """(splits, keys per split) for a decode over `keys` keys with `programs` (batch, K/V head) pairs: enough
    programs for two per SM, each split a whole number of _DECODE_GRANULE keys, at most _MAX_DECODE_SPLITS."""
    wanted = min(_MAX_DECODE_SPLITS, triton.cdiv(2 * _sm_count(device), programs))
    per_split = triton.cdiv(triton.cdiv(keys, wanted), _DECODE_GRANULE) * _DECODE_GRANULE
    return triton.cdiv(keys, per_split), per_split


def _outputs_like(q):
    """An empty (B, H, T, D) tensor laid out (B, T, H, D) in memory, so the caller's y.transpose(1, 2).reshape(B, T,
    H * D) is a view; the forward op's fake version uses it too, so the layouts cannot drift apart."""
    B, H, T, D = q.shape
    return q.new_empty(B, T, H, D).transpose(1, 2)


def _forward(q, k, v, window):
    (B, Hq, Tq, D), Hkv, Tk = q.shape, k.shape[1], k.shape[2]
    o, lse = _outputs_like(q), q.new_empty(B, Hq, Tq, dtype=torch.float32)
    use_tma = _use_tma(q, k, v)
    if use_tma:
        _set_tma_allocator(q.device)
    grid = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * Hq)  # noqa: E731
    _fwd_kernel[grid](q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                      Hq, Tq, Tk, Hq // Hkv, window, D ** -0.5 * _LOG2E, *_tune_args(Tq, Tk, window), HEAD_DIM=D,
                      USE_TMA=use_tma)
    return o, lse


def _backward_dkdv(q, k, v, do, lse, delta, window, dq, use_tma):
    """dK, dV (and dQ added into the fp32 dq when given) from the dK/dV kernel, split as _kv_split says."""
    (B, Hq, Tq, D), Hkv, Tk = q.shape, k.shape[1], k.shape[2]
    split = _kv_split(B, Hkv, Tk, Hq // Hkv, q.device)
    if split > 1:  # fp32 partials per split, summed below in a fixed order
        dk, dv = (k.new_empty(split, *k.shape, dtype=torch.float32) for _ in range(2))
    else:
        dk, dv = torch.empty_like(k).unsqueeze(0), torch.empty_like(v).unsqueeze(0)
    # without the atomic dQ, DQ is a placeholder: one fp32 zero, never written (the tuner's reset zeroes it)
    dq_args = (dq, *dq.stride()) if dq is not None else (q.new_zeros(1, dtype=torch.float32), 0, 0, 0, 0)
    sm_scale = D ** -0.5
    grid = lambda meta: (triton.cdiv(Tk, meta["BLOCK_N"]), B * Hkv, split)  # noqa: E731
    _bwd_dkdv_kernel[grid](q, k, v, do, lse, delta, dk, dv, dq_args[0], *q.stride(), *k.stride(), *v.stride(),
                           *do.stride(), *dk.stride(), *dv.stride(), *dq_args[1:], Hq, Hkv, Tq, Tk, Hq // Hkv,
                           window, sm_scale, sm_scale * _LOG2E, *_tune_args(Tq, Tk, window), HEAD_DIM=D,
                           USE_TMA=use_tma, ATOMIC_DQ=dq is not None)
    if split > 1:  # into k's own layout, as the op's fake version promises
        return torch.empty_like(k).copy_(dk.sum(0)), torch.empty_like(v).copy_(dv.sum(0))
    return dk[0], dv[0]


def _backward(q, k, v, o, lse, do, window, need_dq, need_dkdv, deterministic):
    (B, Hq, Tq, D), Hkv, Tk = q.shape, k.shape[1], k.shape[2]
    use_tma = _use_tma(q, k, v, do)
    if use_tma:
        _set_tma_allocator(q.device)
    delta = torch.empty_like(lse)
    _bwd_preprocess[(triton.cdiv(Tq, _PRE_BLOCK), B * Hq)](o, do, delta, *o.stride(), *do.stride(), Hq, Tq,
                                                          HEAD_DIM=D, BLOCK_M=_PRE_BLOCK)
    dq = dk = dv = None
    atomic_dq = need_dq and need_dkdv and not deterministic and D <= _ATOMIC_DQ_MAX_HEAD_DIM
    if need_dkdv:
        dq = torch.zeros(B, Tq, Hq, D, dtype=torch.float32, device=q.device).transpose(1, 2) if atomic_dq else None
        dk, dv = _backward_dkdv(q, k, v, do, lse, delta, window, dq, use_tma)
        dq = dq.to(q.dtype) if atomic_dq else None
    if need_dq and not atomic_dq:
        dq = _outputs_like(q)
        grid = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * Hq)  # noqa: E731
        _bwd_dq_kernel[grid](q, k, v, do, lse, delta, dq, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
                             *dq.stride(), Hq, Tq, Tk, Hq // Hkv, window, D ** -0.5, D ** -0.5 * _LOG2E,
                             *_tune_args(Tq, Tk, window), HEAD_DIM=D, USE_TMA=use_tma)
    return dq, dk, dv


def _decode(q, k, v, window):
    (B, Hq, _, D), Hkv, Tk = q.shape, k.shape[1], k.shape[2]
    key_start = max(0, Tk - window)  # the one query sits at position Tk - 1
    n_splits, keys_per_split = _decode_splits(B * Hkv, Tk - key_start, q.device)
    o_part = q.new_empty(B * Hq, n_splits, D, dtype=torch.float32)
    lse_part = q.new_empty(B * Hq, n_splits, dtype=torch.float32)
    q_per_kv = Hq // Hkv
    _decode_kernel[(n_splits, B * Hkv)](q, k, v, o_part, lse_part, q.stride(0), q.stride(1), q.stride(3),
                                        *k.stride(), *v.stride(), Hkv, Tk, q_per_kv, key_start, keys_per_split,
                                        D ** -0.5 * _LOG2E, triton.next_power_of_2(keys_per_split), HEAD_DIM=D,
                                        BLOCK_H=max(16, triton.next_power_of_2(q_per_kv)))
    o = _outputs_like(q)
    _decode_merge_kernel[(B * Hq,)](o_part, lse_part, o, o.stride(0), o.stride(1), o.stride(3), Hq, n_splits,
                                    HEAD_DIM=D, BLOCK_S=triton.next_power_of_2(n_splits))
    return o


# Custom ops: torch.compile sees each kernel launch as one opaque node with a fake (shape-only) version, instead of
# tracing into Triton's launcher. A gradient that is not needed comes back as an empty tensor (ops return tensors).
@torch.library.custom_op("nanogpt_attention::forward", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, window)


@_forward_op.register_fake
def _(q, k, v, window):
    return _outputs_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("nanogpt_attention::backward", mutates_args=())
def _backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                 do: torch.Tensor, window: int, need_dq: bool, need_dkdv: bool,
                 deterministic: bool) -> list[torch.Tensor]:
    grads = _backward(q, k, v, o, lse, do, window, need_dq, need_dkdv, deterministic)
    return [q.new_empty(0) if g is None else g for g in grads]  # outputs may not alias: one empty each


@_backward_op.register_fake
def _(q, k, v, o, lse, do, window, need_dq, need_dkdv, deterministic):
    return [(_outputs_like(q) if need_dq else q.new_empty(0)), *(torch.empty_like(t) if need_dkdv else q.new_empty(0)
                                                                   for t in (k, v))]


@torch.library.custom_op("nanogpt_attention::decode", mutates_args=())
def _decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    return _decode(q, k, v, window)


@_decode_op.register_fake
def _(q, k, v, window):
    return _outputs_like(q)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window, deterministic):
        o, lse = _forward_op(q, k, v, window)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.window, ctx.deterministic = window, deterministic
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        need_dq, need_dk, need_dv = ctx.needs_input_grad[:3]
        dq, dk, dv = _backward_op(q, k, v, o, lse, do, ctx.window, need_dq, need_dk or need_dv, ctx.deterministic)
        return dq if need_dq else None, dk if need_dk else None, dv if need_dv else None, None, None


def flash_attention(q, k, v, window=None, deterministic=False):
    """Causal attention of q (B, Hq, Tq, D) over k, v (B, Hkv, Tk, D), Hq a multiple of Hkv. Query row r sits at
    position i = r + Tk - Tq and sees the keys j with i - window < j <= i (window=None: every j <= i). Inputs may
    have any strides; bf16 or fp16 (fp32 works, slowly); D in SUPPORTED_HEAD_DIMS. Differentiable in q, k, v
    (Tq < Tk included); deterministic=True computes dQ without atomics, so gradients are bitwise reproducible.
    The result is a (B, Hq, Tq, D) view of a (B, Tq, Hq, D) buffer."""
    _check_inputs(q, k, v, window, for_kernel=True)
    Tk = k.size(2)
    window = Tk if window is None else min(window, Tk)  # a window of Tk keys or more is plain causal attention
    return _FlashAttention.apply(q, k, v, window, bool(deterministic))


def flash_decode(q, k, v, window=None):
    """One decode step: q (B, Hq, 1, D), the newest position of each sequence, over the cached k, v (B, Hkv, Tk, D)
    (any strides, e.g. a prefix view of a ring buffer: key order does not matter when every key is visible). The
    query sits at position Tk - 1 and sees keys j > Tk - 1 - window. The result equals
    flash_attention(q, k, v, window) (same layout), from a kernel that reads each K/V block once per group of
    query heads and splits long caches across programs. Inference only: no gradient."""
    _check_inputs(q, k, v, window, for_kernel=True)
    if q.size(2) != 1:
        raise ValueError(f"flash_decode takes one query position (q of shape (B, Hq, 1, D)), got {q.size(2)}; "
                         "use flash_attention for a prefill")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("flash_decode has no backward; call it under torch.no_grad() or use flash_attention")
    Tk = k.size(2)
    return _decode_op(q, k, v, Tk if window is None else min(window, Tk))


def attention_reference(q, k, v, window=None):
    """Plain PyTorch version of flash_attention: same shapes and semantics, any float dtype, any device. Computes in
    at least fp32 and returns q's dtype. Materialises the (Tq, Tk) scores and the repeated K/V heads."""
    _check_inputs(q, k, v, window, for_kernel=False)
    Tq, Tk, q_per_kv = q.size(2), k.size(2), q.size(1) // k.size(1)
    dtype = torch.promote_types(q.dtype, torch.float32)
    k = k.to(dtype).repeat_interleave(q_per_kv, dim=1)  # query head h reads K/V head h // q_per_kv
    v = v.to(dtype).repeat_interleave(q_per_kv, dim=1)
    scores = (q.to(dtype) @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    probs = torch.softmax(scores.masked_fill(~attention_mask(Tq, Tk, window, q.device), float("-inf")), dim=-1)
    return (probs @ v).to(q.dtype)
