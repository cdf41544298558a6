"""fp8 training: quantize kernels, scaled GEMMs and an nn.Linear drop-in, in Triton with PyTorch references beside them.

Formats: e4m3 (torch.float8_e4m3fn: max 448, 3 mantissa bits) for activations and weights; e5m2 (max 57344, 2 bits)
for gradients in the tensorwise recipe.
Scaling ("scaling" argument): one fp32 scale per group of a 2-D tensor x (R, C):
    tensor  one group                        scale shape (1, 1)
    row     1 x C (a whole row)              (R, 1)
    tile    1 x 128 (DeepSeek-V3 activations) (R, ceil(C/128)), stored K-block-major (a transposed view)
    block   128 x 128 (DeepSeek-V3 weights)   (ceil(R/128), ceil(C/128))
Per group: amax = max(max|x|, EPS), s = amax / fp8_max (the dequantization scale, stored), q = saturate(x * (fp8_max /
amax)), so x ~= q * s. Both divisions are IEEE round-to-nearest (div_rn in the kernels: Triton's plain `/` is
approximate on NVIDIA); EPS keeps all-zero groups finite (q = 0). A NaN in a group makes its amax, scale and every
q of the group NaN, as in the reference (a silently finite scale would hide it). On the GPU the cast is the
hardware's saturating fp8 conversion; in the interpreter, integer rounding that is bit-identical. Scales are plain
fp32, not rounded to powers of two: that is DeepSeek-V3's recipe, it uses the whole e4m3 range (a power-of-two scale
puts amax anywhere in (fp8_max/2, fp8_max], losing up to one binade at the subnormal end), and exactness between
kernel and reference is already had from the IEEE divisions (torchao rounds rowwise scales to powers of two;
MX/UE8M0 formats need it).
Quantize with with_t=True also returns (q^T, s^T): x^T quantized with the same scaling, i.e. the operand layout the
backward GEMMs need, written transposed by the same kernel (tensor/tile/block: same single read of x; row: the column
amax needs a reduction over all rows, so it is a second pass of the row kernel over x's transposed view).
GEMM: scaled_mm(a, b, sa, sb) = (a * sa) @ (b * sb)^T with a (M, K), b (N, K), both K-contiguous ("TN", the layout
fp8 tensor cores take, and the nn.Linear weight layout). Accumulation is fp32; for block scaling every 128-wide K
block's partial product is scaled by sa_tile * sb_block and added into the fp32 accumulator (DeepSeek-V3 promotion).
Shapes need no divisibility: all loads are masked (incl. partial 128-groups at the edges of K). Speed does: Triton
vectorizes and pipelines the GEMM loads only when K and the row strides are multiples of 16 (so grad_W, whose K is
the token count, is slow for token counts that are not; padding them is left to the caller). Offsets are 64-bit, so an
operand may pass 2^31 elements; autotune keys bucket sizes to powers of two, so a new MoE token count does not retune.
"""
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
GROUP = 128                       # tile / block edge
EPS = 1e-12                       # amax floor: fp8_max / EPS stays finite in fp32
_EPS = tl.constexpr(EPS)          # kernels may only read constexpr globals
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_SOFTWARE_CAST = tl.constexpr(INTERPRET)  # see _quant_mul
FORMATS = {E4M3: (3, 7, 448.0), E5M2: (2, 15, 57344.0)}  # mantissa bits, exponent bias, max finite


def _scale_shape(R, C, scaling):
    cdiv = triton.cdiv
    return {"tensor": (1, 1), "row": (R, 1), "tile": (R, cdiv(C, GROUP)),
            "block": (cdiv(R, GROUP), cdiv(C, GROUP))}[scaling]


def _new_scales(R, C, scaling, device):
    """Empty fp32 scales of an (R, C) operand. 1 x 128 tile scales are stored K-block-major ((C/128, R) in memory),
    so that the GEMM reads one K block's scales of BM rows as one contiguous load."""
    shape = _scale_shape(R, C, scaling)
    if scaling == "tile":
        return torch.empty(shape[::-1], dtype=torch.float32, device=device).t()
    return torch.empty(shape, dtype=torch.float32, device=device)


def _tune_size(n):
    """Power-of-two bucket of a size for autotune keys: an MoE expert's token count changes every step, and keying
    on it exactly would retune the kernels each time."""
    return triton.next_power_of_2(max(n, 1))


# ------------------------------------------------------------------------------------------------- quantize: Triton

@triton.jit
def _abs_max(x, axis):
    """max |x| along axis (None: all), NaN if any element is NaN (tl.max drops NaN, which would hide it behind a
    finite scale). The int32 bit patterns of |x| order as the values do, with NaN above inf."""
    return tl.max(tl.abs(x).to(tl.int32, bitcast=True), axis).to(tl.float32, bitcast=True)


@triton.jit
def _floor_eps(amax):
    """amax floored at EPS, so all-zero groups get a finite scale; NaN stays NaN."""
    return tl.maximum(amax, _EPS, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _fp8_bits(x, MANT: tl.constexpr, BIAS: tl.constexpr):
    """Bit pattern (uint8) of fp32 x (|x| <= fp8 max, or NaN) rounded to the fp8 format, round-to-nearest-even like
    torch. The interpreter's path (see _quant_mul).

    Not `x.to(tl.float8e4nv)`: Triton 3.9's interpreter rounds that cast half-up on the magnitude and drops the carry
    out of the mantissa (126.0 -> 64.0 instead of 128.0, 1.0625 -> 1.125 instead of 1.0, no subnormal rounding, 464 ->
    NaN), so it differs from torch and from the GPU. Integer rounding here is tested bit for bit against torch."""
    SHIFT: tl.constexpr = 23 - MANT
    a = tl.abs(x)
    bits = a.to(tl.int32, bitcast=True)
    # normal range: drop SHIFT mantissa bits, adding half an ulp minus one plus the kept lsb (= ties to even);
    # a carry out of the mantissa correctly bumps the exponent. Then re-bias the exponent from 127 to BIAS.
    normal = ((bits + ((1 << (SHIFT - 1)) - 1) + ((bits >> SHIFT) & 1)) >> SHIFT) - ((127 - BIAS) << MANT)
    # subnormal range (a < 2^(1-BIAS)): adding 2^(24-BIAS-MANT) makes the fp32 adder round a to a multiple of the fp8
    # subnormal step 2^(1-BIAS-MANT), ties to even; the low bits of the sum are then the fp8 code (8 = smallest normal)
    magic = tl.full(a.shape, 2.0 ** (24 - BIAS - MANT), tl.float32)
    sub = (a + magic).to(tl.int32, bitcast=True) - magic.to(tl.int32, bitcast=True)
    code = tl.where(a < 2.0 ** (1 - BIAS), sub, normal)
    code = tl.where(a != a, 0x7F, code)  # NaN: torch's code for both formats
    sign = (x.to(tl.int32, bitcast=True) >> 24) & 0x80
    return (code | sign).to(tl.uint8)


@triton.jit
def _round_bf16(x):
    """fp32 rounded to the nearest bf16 value, ties to even (returned as fp32, so the later cast is exact): the
    interpreter's fp32 -> bf16 cast truncates, the GPU's rounds; this makes both equal torch's."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536 = 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _quant_mul(x, amax, MANT: tl.constexpr, BIAS: tl.constexpr, FP8_MAX: tl.constexpr):
    """fp8 bits (uint8) of x * (fp8_max / amax), saturated at +-fp8_max, NaN kept. Compiled, one hardware cast
    (cvt.rn.satfinite: round to nearest even, saturating); in the interpreter, integer rounding (_fp8_bits)."""
    y = x * tl.fdiv(FP8_MAX, amax, ieee_rounding=True)
    if _SOFTWARE_CAST:
        return _fp8_bits(tl.clamp(y, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL), MANT, BIAS)
    elif MANT == 3:
        return y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    else:
        return y.to(tl.float8e5).to(tl.uint8, bitcast=True)


@triton.jit
def _amax_kernel(x_ptr, amax_bits_ptr, R, C, stride_r, stride_c, BR: tl.constexpr, BC: tl.constexpr):
    """max |x| into an int32 holding the fp32 bits: an integer max keeps NaN (a float atomic max would drop it)."""
    rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    cols = (tl.program_id(1) * BC + tl.arange(0, BC)).to(tl.int64)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    x = tl.load(x_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0)
    amax = _abs_max(x.to(tl.float32), None)
    tl.atomic_max(amax_bits_ptr, amax.to(tl.int32, bitcast=True))  # one atomic per 16K elements


# 8 or 16 warps: with 4, the 128 x 128 tile plus its transpose spill (python -m nanokernels.check_compile)
@triton.autotune(configs=[triton.Config({}, num_warps=w) for w in ((4,) if INTERPRET else (8, 16))],
                 key=["TUNE_R", "TUNE_C", "SCALING", "WRITE_T"])
@triton.jit
def _quant_tiles_kernel(x_ptr, amax_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, R, C, stride_r, stride_c, TUNE_R, TUNE_C,
                        SCALING: tl.constexpr, WRITE_T: tl.constexpr, MANT: tl.constexpr, BIAS: tl.constexpr,
                        FP8_MAX: tl.constexpr, B: tl.constexpr):
    """One B x B (B = 128) tile per program: scale per tensor (amax from _amax_kernel), per tile row (1 x 128 groups
    of q) and column (128 x 1 groups = 1 x 128 groups of q^T), or per block; writes q (R, C) and q^T (C, R). Tile
    scales go K-block-major (_new_scales)."""
    pid_r, pid_c = tl.program_id(0), tl.program_id(1)
    rows = (pid_r * B + tl.arange(0, B)).to(tl.int64)
    cols = (pid_c * B + tl.arange(0, B)).to(tl.int64)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    x = tl.load(x_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0).to(tl.float32)
    q_ptrs = q_ptr + rows[:, None] * C + cols[None, :]
    qt_ptrs = qt_ptr + cols[None, :] * R + rows[:, None]  # the tile transposed: Triton re-lays it out for coalescing
    if SCALING == "tile":  # q stored before q^T is made: both live at once cost 2 blocks per SM
        amax = _floor_eps(_abs_max(x, 1))
        tl.store(s_ptr + pid_c * R + rows, tl.fdiv(amax, FP8_MAX, ieee_rounding=True), mask=rows < R)
        tl.store(q_ptrs, _quant_mul(x, amax[:, None], MANT, BIAS, FP8_MAX), mask=mask)
        if WRITE_T:
            amax_t = _floor_eps(_abs_max(x, 0))
            tl.store(st_ptr + pid_r * C + cols, tl.fdiv(amax_t, FP8_MAX, ieee_rounding=True), mask=cols < C)
            tl.store(qt_ptrs, _quant_mul(x, amax_t[None, :], MANT, BIAS, FP8_MAX), mask=mask)
    else:
        if SCALING == "tensor":
            amax = _floor_eps(tl.load(amax_ptr))
            if (pid_r == 0) & (pid_c == 0):  # one program writes the scale
                tl.store(s_ptr, tl.fdiv(amax, FP8_MAX, ieee_rounding=True))
                if WRITE_T:
                    tl.store(st_ptr, tl.fdiv(amax, FP8_MAX, ieee_rounding=True))
        else:  # block: s[i, j] and s^T[j, i]
            amax = _floor_eps(_abs_max(x, None))
            tl.store(s_ptr + pid_r * tl.num_programs(1) + pid_c, tl.fdiv(amax, FP8_MAX, ieee_rounding=True))
            if WRITE_T:
                tl.store(st_ptr + pid_c * tl.num_programs(0) + pid_r, tl.fdiv(amax, FP8_MAX, ieee_rounding=True))
        q = _quant_mul(x, amax, MANT, BIAS, FP8_MAX)
        tl.store(q_ptrs, q, mask=mask)
        if WRITE_T:
            tl.store(qt_ptrs, q, mask=mask)


def _rows_configs():
    if INTERPRET:
        return [triton.Config({"BR": 16, "BC": 64})]
    return [triton.Config({"BR": br, "BC": bc}, num_warps=w) for br, bc, w in
            ((8, 512, 4), (16, 256, 4), (32, 256, 8), (64, 128, 8))]


@triton.autotune(configs=_rows_configs(), key=["TUNE_R", "TUNE_C", "ROW_MAJOR"])
@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, R, C, stride_r, stride_c, TUNE_R, TUNE_C, ROW_MAJOR,
                       MANT: tl.constexpr, BIAS: tl.constexpr, FP8_MAX: tl.constexpr, BR: tl.constexpr,
                       BC: tl.constexpr):
    """BR whole rows per program, two passes over C (amax, then cast); x may be a strided (e.g. transposed) view."""
    rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    amax = tl.zeros((BR,), tl.float32)
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC).to(tl.int64)
        mask = (rows[:, None] < R) & (cols[None, :] < C)
        x = tl.load(x_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0)
        amax = tl.maximum(amax, _abs_max(x.to(tl.float32), 1), propagate_nan=tl.PropagateNan.ALL)
    amax = _floor_eps(amax)
    tl.store(s_ptr + rows, tl.fdiv(amax, FP8_MAX, ieee_rounding=True), mask=rows < R)
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC).to(tl.int64)
        mask = (rows[:, None] < R) & (cols[None, :] < C)
        x = tl.load(x_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0)
        q = _quant_mul(x.to(tl.float32), amax[:, None], MANT, BIAS, FP8_MAX)
        tl.store(q_ptr + rows[:, None] * C + cols[None, :], q, mask=mask)


def quantize_triton(x, scaling, dtype=E4M3, with_t=False):
    """(q, s) or, with_t, (q, s, q^T, s^T) for 2-D x; see the module docstring for scalings and shapes."""
    R, C = x.shape
    mant, bias, fmax = FORMATS[dtype]
    new_q = lambda r, c, sc: (torch.empty(r, c, dtype=dtype, device=x.device), _new_scales(r, c, sc, x.device))
    if scaling == "row":
        outs = []
        for v in ((x, x.t()) if with_t else (x,)):
            q, s = new_q(*v.shape, "row")
            if v.numel():
                grid = lambda meta: (triton.cdiv(v.shape[0], meta["BR"]),)
                _quant_rows_kernel[grid](v, q.view(torch.uint8), s, *v.shape, *v.stride(), _tune_size(v.shape[0]),
                                         _tune_size(v.shape[1]), int(v.stride(1) == 1), mant, bias, fmax)
            outs += [q, s]
        return tuple(outs)
    if scaling not in ("tensor", "tile", "block"):
        raise ValueError(f"unknown scaling {scaling!r}: expected tensor, row, tile or block")
    q, s = new_q(R, C, scaling)
    qt, st = new_q(C, R, scaling) if with_t else (q, s)  # (unused placeholders when not with_t)
    amax = torch.zeros(1, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(R, GROUP), triton.cdiv(C, GROUP))
    if scaling == "tensor" and x.numel():
        _amax_kernel[grid](x, amax.view(torch.int32), R, C, *x.stride(), BR=GROUP, BC=GROUP)
    if x.numel():
        _quant_tiles_kernel[grid](x, amax, q.view(torch.uint8), s, qt.view(torch.uint8), st, R, C, *x.stride(),
                                  _tune_size(R), _tune_size(C), SCALING=scaling, WRITE_T=with_t, MANT=mant, BIAS=bias,
                                  FP8_MAX=fmax, B=GROUP)  # by name: check_compile reads the specialisation
    elif scaling == "tensor":  # empty input: the scale of an all-zero tensor
        s.fill_(EPS).div_(fmax), st.fill_(EPS).div_(fmax)
    return (q, s, qt, st) if with_t else (q, s)


# ---------------------------------------------------------------------------------------------- quantize: reference

def _expand(s, R, C, scaling):
    """Per-group scales broadcast to per-element (R, C)."""
    if scaling == "tile":
        return s.repeat_interleave(GROUP, 1)[:, :C]
    if scaling == "block":
        return s.repeat_interleave(GROUP, 0).repeat_interleave(GROUP, 1)[:R, :C]
    return s.expand(R, C)


def _quantize_ref(x, scaling, dtype):
    R, C = x.shape
    fmax = FORMATS[dtype][2]
    a = x.abs()
    if scaling == "tensor":
        amax = a.amax().reshape(1, 1) if x.numel() else a.new_zeros(1, 1)
    elif scaling == "row":
        amax = a.amax(1, keepdim=True) if C else a.new_zeros(R, 1)
    elif scaling == "tile":
        pc = -C % GROUP
        amax = F.pad(a, (0, pc)).view(R, (C + pc) // GROUP, GROUP).amax(2)
    elif scaling == "block":
        pr, pc = -R % GROUP, -C % GROUP
        amax = F.pad(a, (0, pc, 0, pr)).view((R + pr) // GROUP, GROUP, (C + pc) // GROUP, GROUP).amax((1, 3))
    else:
        raise ValueError(f"unknown scaling {scaling!r}: expected tensor, row, tile or block")
    amax = amax.clamp(min=EPS)
    fmax_t = torch.full_like(amax, fmax)
    r = fmax_t / amax                              # IEEE division (not `fmax / amax`: that is reciprocal * fmax)
    q = (x * _expand(r, R, C, scaling)).clamp(-fmax, fmax).to(dtype)  # torch's cast rounds to nearest even
    return q.contiguous(), _new_scales(R, C, scaling, x.device).copy_(amax / fmax_t)  # the kernel's layouts


def quantize_ref(x, scaling, dtype=E4M3, with_t=False):
    """PyTorch reference of quantize_triton: equal to it bit for bit."""
    x = x.float()
    out = _quantize_ref(x, scaling, dtype)
    return out + _quantize_ref(x.t(), scaling, dtype) if with_t else out


def dequantize(q, s, scaling, dtype=torch.float32):
    return q.to(dtype) * _expand(s.to(dtype), *q.shape, scaling)


# ----------------------------------------------------------------------------------------------------- scaled GEMM

def _mm_configs():
    if INTERPRET:
        return [triton.Config({"BM": 32, "BN": 32, "BK": GROUP, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    # smem per stage (BM + BN) * BK bytes: 256x128x128 x 3 stages = 144 KB fits Hopper's 227 KB per block; the last
    # two (48 KB, 72 KB) also fit sm_89's 99 KB (configs that do not fit are skipped by the autotuner). Compiled
    # offline for sm_90a: wgmma, pipelined, no spills (128x256 spilled: the promotion needs a second accumulator).
    shapes = ((256, 128, 8, 3), (128, 128, 8, 4), (128, 128, 4, 4), (64, 128, 4, 5), (128, 64, 4, 5),
              (64, 64, 4, 3), (128, 64, 4, 3))
    return [triton.Config({"BM": bm, "BN": bn, "BK": GROUP, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, w, s in shapes]


def _mm_prune(configs, named_args, **kw):
    # blockwise keeps the per-K-block product and the accumulator live at once: allow at most 64 fp32 accumulator
    # registers per thread (so 128 for both) or it spills
    blockwise = kw.get("BLOCKWISE", named_args.get("BLOCKWISE"))
    fits = lambda c: c.kwargs["BM"] * c.kwargs["BN"] <= 64 * 32 * c.num_warps
    return [c for c in configs if not blockwise or fits(c)]


@triton.autotune(configs=_mm_configs(), key=["TUNE_M", "TUNE_N", "TUNE_K", "BLOCKWISE", "B_GROUP_N"],
                 prune_configs_by={"early_config_prune": _mm_prune})
@triton.jit
def _scaled_mm_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, M, N, K, stride_am, stride_bn, stride_cm,
                      stride_sam, stride_sak, stride_sbn, stride_sbk, TUNE_M, TUNE_N, TUNE_K,
                      BLOCKWISE: tl.constexpr, B_GROUP_N: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """C = (A sa)(B sb)^T. sa is indexed [m * stride_sam (+ kb * stride_sak)], sb [(n // B_GROUP_N) * stride_sbn
    (+ kb * stride_sbk)]: stride 0 = per tensor, 1 = per row/column; with BLOCKWISE a scale per 128-wide K block
    (B_GROUP_N = 128: B in 128 x 128 blocks, one scale for the whole BN-wide tile)."""
    tl.static_assert(B_GROUP_N == 1 or B_GROUP_N % BN == 0)
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    group = pid // (GROUP_M * n_n)             # GROUP_M row-tiles sweep the columns together: B tiles stay in L2
    first_m = group * GROUP_M
    size_m = min(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    pid_n = (pid % (GROUP_M * n_n)) // size_m
    offs_m = (pid_m * BM + tl.arange(0, BM)) % M   # wrap out-of-range rows onto valid ones; their results are masked
    offs_n = (pid_n * BN + tl.arange(0, BN)) % N
    offs_k = tl.arange(0, BK)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]   # (BK, BN) view of the K-major B^T
    sa_ptrs = sa_ptr + offs_m * stride_sam
    sb_ptrs = sb_ptr + (offs_n // B_GROUP_N) * stride_sbn
    sb_block = sb_ptr + (pid_n * BN // B_GROUP_N) * stride_sbn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BK)):
        k_left = K - kb * BK
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if BLOCKWISE:  # promote every 128 of K: partial product in fp32, rescaled, added on CUDA cores
            sa = tl.load(sa_ptrs + kb * stride_sak)  # BM contiguous scales: tile scales are K-block-major
            if B_GROUP_N == 1:
                acc += tl.dot(a, b) * (sa[:, None] * tl.load(sb_ptrs + kb * stride_sbk)[None, :])
            else:
                acc += tl.dot(a, b) * (sa * tl.load(sb_block + kb * stride_sbk))[:, None]
        else:  # max_num_imprecise_acc=BK: on sm_90 Triton otherwise leaves all of K in wgmma's reduced-precision
            acc = tl.dot(a, b, acc, max_num_imprecise_acc=BK)  # accumulator; this promotes to fp32 every BK
        a_ptrs += BK
        b_ptrs += BK
    if not BLOCKWISE:
        acc *= tl.load(sa_ptrs)[:, None] * tl.load(sb_ptrs)[None, :]
    if c_ptr.dtype.element_ty == tl.bfloat16:
        acc = _round_bf16(acc)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    tl.store(c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


def _check_mm(a, b, sa, sb, scaling):
    """Validate shapes; return the number of rows of b sharing a scale (128 for 128x128 blocks, else 1)."""
    (M, K), (N, Kb) = a.shape, b.shape
    if Kb != K or a.dtype not in FORMATS or b.dtype not in FORMATS:
        raise ValueError(f"scaled_mm takes fp8 a (M, K) and b (N, K); got {a.dtype} {tuple(a.shape)}, "
                         f"{b.dtype} {tuple(b.shape)}")
    kb = triton.cdiv(K, GROUP)
    want = {"tensor": ((1, 1), [(1, 1)]), "row": ((M, 1), [(N, 1)]),
            "block": ((M, kb), [(N, kb), (triton.cdiv(N, GROUP), kb)])}
    if scaling not in want:
        raise ValueError(f"unknown GEMM scaling {scaling!r}: expected tensor, row or block")
    if tuple(sa.shape) != want[scaling][0] or tuple(sb.shape) not in want[scaling][1]:
        raise ValueError(f"{scaling} scaled_mm with M={M} N={N} K={K} takes sa {want[scaling][0]} and sb one of "
                         f"{want[scaling][1]}; got {tuple(sa.shape)}, {tuple(sb.shape)}")
    return GROUP if scaling == "block" and sb.shape[0] != N else 1


def scaled_mm_triton(a, b, sa, sb, scaling, out_dtype=torch.bfloat16):
    """(a * sa) @ (b * sb)^T, fp32 accumulation. a (M, K) and b (N, K) fp8, K-contiguous. tensor: sa, sb (1, 1);
    row: sa (M, 1), sb (N, 1); block: sa (M, ceil(K/128)) 1x128 tiles, sb (ceil(N/128), ceil(K/128)) 128x128 blocks
    or (N, ceil(K/128)) 1x128 tiles (the weight-gradient GEMM, where both operands are activations)."""
    group_n = _check_mm(a, b, sa, sb, scaling)
    if a.stride(1) != 1 or b.stride(1) != 1:
        raise ValueError("scaled_mm needs K-contiguous a and b (stride 1 along K)")
    (M, K), N = a.shape, b.shape[0]
    c = torch.empty(M, N, dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    per = lambda s: 0 if s.shape[0] == 1 else s.stride(0)  # stride 0 broadcasts a single scale over rows
    grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)
    _scaled_mm_kernel[grid](a, b, c, sa, sb, M, N, K, a.stride(0), b.stride(0), c.stride(0),
                            per(sa), sa.stride(1), per(sb), sb.stride(1), _tune_size(M), _tune_size(N),
                            _tune_size(K), BLOCKWISE=scaling == "block", B_GROUP_N=group_n)
    return c


def scaled_mm_ref(a, b, sa, sb, scaling, out_dtype=torch.bfloat16):
    """The kernel's numerics in PyTorch (also the CPU path): fp8 products summed in fp32 (fp8 x fp8 is exact in fp32),
    scaled in the epilogue, or per 128-wide K block for block scaling."""
    group_n = _check_mm(a, b, sa, sb, scaling)
    A, B = a.float(), b.float()
    if scaling != "block":
        return ((A @ B.t()) * (sa * sb.t())).to(out_dtype)
    (M, K), N = A.shape, B.shape[0]
    pad = -K % GROUP
    KB = (K + pad) // GROUP
    A = F.pad(A, (0, pad)).view(M, KB, GROUP).transpose(0, 1)           # (KB, M, 128)
    B = F.pad(B, (0, pad)).view(N, KB, GROUP).permute(1, 2, 0)           # (KB, 128, N)
    sb = sb.repeat_interleave(group_n, 0)[:N]
    return ((A @ B) * (sa.t()[:, :, None] * sb.t()[:, None, :])).sum(0).to(out_dtype)


# ------------------------------------------------------------------- dispatch (custom ops, opaque to torch.compile)

def _use_triton(x, backend):
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend {backend!r}: expected auto, triton or torch")
    fp8_gpu = x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9)  # Ada / Hopper and later
    return backend == "triton" or (backend == "auto" and fp8_gpu)


@torch.library.custom_op("nanogpt_fp8::quantize", mutates_args=())
def _quantize_op(x: torch.Tensor, scaling: str, dtype: torch.dtype, with_t: bool, backend: str) -> list[torch.Tensor]:
    return list((quantize_triton if _use_triton(x, backend) else quantize_ref)(x, scaling, dtype, with_t))


@_quantize_op.register_fake
def _(x, scaling, dtype, with_t, backend):
    shapes = [(x.shape[0], x.shape[1])] + ([(x.shape[1], x.shape[0])] if with_t else [])
    return [t for r, c in shapes for t in (x.new_empty(r, c, dtype=dtype), _new_scales(r, c, scaling, x.device))]


@torch.library.custom_op("nanogpt_fp8::scaled_mm", mutates_args=())
def _scaled_mm_op(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, scaling: str,
                  out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    return (scaled_mm_triton if _use_triton(a, backend) else scaled_mm_ref)(a, b, sa, sb, scaling, out_dtype)


@_scaled_mm_op.register_fake
def _(a, b, sa, sb, scaling, out_dtype, backend):
    return a.new_empty(a.shape[0], b.shape[0], dtype=out_dtype)


def quantize(x, scaling, dtype=E4M3, with_t=False, backend="auto"):
    """Triton kernel on CUDA with compute capability >= 8.9 (or backend='triton'), else the PyTorch reference."""
    return tuple(_quantize_op(x, scaling, dtype, with_t, backend))


def scaled_mm(a, b, sa, sb, scaling, out_dtype=torch.bfloat16, backend="auto"):
    return _scaled_mm_op(a, b, sa, sb, scaling, out_dtype, backend)


# ------------------------------------------------------------------------------------------------------ fp8 Linear

@dataclass(frozen=True)
class Recipe:
    act: str            # scaling of x and grad_y (contraction dim along rows; with_t gives the other orientation)
    weight: str         # scaling of W
    gemm: str           # scaled_mm scaling
    grad_dtype: torch.dtype


RECIPES = {
    # per-tensor scales; grad_y in e5m2 for range (torchao's tensorwise)
    "tensorwise": Recipe("tensor", "tensor", "tensor", E5M2),
    # one scale per row along each GEMM's contraction dim: fwd x rows, W rows (over K); grad_x: grad_y rows, W columns
    # (over N); grad_W: grad_y and x columns (over tokens). e4m3 for grads too, as torchao's rowwise.
    "rowwise": Recipe("row", "row", "row", E4M3),
    # DeepSeek-V3: 1x128 tiles for x and grad_y (128x1 in their transposed uses), 128x128 blocks for W, e4m3 all over
    "blockwise": Recipe("tile", "block", "block", E4M3),
}


class _Fp8Matmul(torch.autograd.Function):
    """y = x W^T with x (M, K), W (N, K); all three GEMMs in fp8. Saves the fp8 operands of the backward GEMMs
    (x^T and W^T quantized, 1 byte per element) instead of x and W."""

    @staticmethod
    def forward(ctx, x, w, recipe, backend, out_dtype, grad_enabled):
        r = RECIPES[recipe]
        need_gx = grad_enabled and ctx.needs_input_grad[0]  # (needs_input_grad ignores no_grad mode)
        need_gw = grad_enabled and ctx.needs_input_grad[1]
        xq, sx, *xt = quantize(x, r.act, E4M3, need_gw, backend)      # xt = (x^T q, s): B of grad_W
        wq, sw, *wt = quantize(w, r.weight, E4M3, need_gx, backend)   # wt = (W^T q, s): B of grad_x
        ctx.save_for_backward(*xt, *wt)
        ctx.args = recipe, backend, x.dtype, w.dtype, need_gx, need_gw
        return scaled_mm(xq, wq, sx, sw, r.gemm, out_dtype, backend)

    @staticmethod
    def backward(ctx, gy):
        recipe, backend, x_dtype, w_dtype, need_gx, need_gw = ctx.args
        r = RECIPES[recipe]
        saved = list(ctx.saved_tensors)
        xt = saved[:2] if need_gw else None
        wt = saved[-2:] if need_gx else None
        gq, sg, *gt = quantize(gy, r.act, r.grad_dtype, need_gw, backend)
        gx = scaled_mm(gq, wt[0], sg, wt[1], r.gemm, x_dtype, backend) if need_gx else None         # grad_y W
        gw = scaled_mm(gt[0], xt[0], gt[1], xt[1], r.gemm, w_dtype, backend) if need_gw else None  # grad_y^T x
        return gx, gw, None, None, None, None


def fp8_linear(x, weight, bias=None, recipe="tensorwise", backend="auto"):
    """F.linear in fp8 (forward and both backward GEMMs). Output dtype: x's, or the autocast dtype under autocast."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown fp8 recipe {recipe!r}: expected one of {sorted(RECIPES)}")
    dev = x.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    y = _Fp8Matmul.apply(x.reshape(-1, x.shape[-1]), weight, recipe, backend, out_dtype, torch.is_grad_enabled())
    y = y.view(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias.to(y.dtype)


def fp8_supported(in_features, out_features):
    """Layers the fp8 path takes: both dims multiples of 16, so every fp8 row starts 16-byte aligned (the rule of
    torch._scaled_mm / cuBLASLt). The kernels mask any shape; smaller or odd layers are not worth fp8 anyway."""
    return in_features % 16 == 0 and out_features % 16 == 0


class Float8Linear(nn.Linear):
    """nn.Linear whose matmuls run in fp8; parameters, state_dict, optimizer state and gradients as nn.Linear's."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, recipe="tensorwise",
                 backend="auto"):
        super().__init__(in_features, out_features, bias, device, dtype)
        if recipe not in RECIPES:
            raise ValueError(f"unknown fp8 recipe {recipe!r}: expected one of {sorted(RECIPES)}")
        self.recipe, self.backend = recipe, backend

    def forward(self, x):
        return fp8_linear(x, self.weight, self.bias, self.recipe, self.backend)

    def extra_repr(self):
        return f"{super().extra_repr()}, recipe={self.recipe}"


def convert_to_fp8(module, recipe="tensorwise", filter_fn=None):
    """Swap, in place, every nn.Linear under module with filter_fn(linear, name) true (all if None) for a Float8Linear
    holding the same Parameter objects (so optimizers and tied weights stay valid). Returns the names of the chosen
    layers left as they were because fp8_supported() rejects their dims."""
    if type(module) is nn.Linear:
        raise ValueError("convert_to_fp8 swaps submodules in place; for a bare nn.Linear build a Float8Linear")
    skipped = []
    for name, child in list(module.named_modules()):
        if type(child) is not nn.Linear or (filter_fn is not None and not filter_fn(child, name)):
            continue
        if not fp8_supported(child.in_features, child.out_features):
            skipped.append(name)
            continue
        new = Float8Linear(child.in_features, child.out_features, child.bias is not None, device="meta",
                           recipe=recipe)
        new.weight, new.bias = child.weight, child.bias
        new.train(child.training)
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name), attr, new)
    return skipped
