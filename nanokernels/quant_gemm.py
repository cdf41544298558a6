"""Weight-only quantized GEMM: y = x @ W^T with W held as int8 or int4 codes and dequantized inside the kernel, in
Triton, with the PyTorch reference beside it (also the CPU path). nanogpt/quant.py makes the codes.

Formats of a weight W (N, K) (nn.Linear layout: N outputs, K inputs):
    int8  q int8 (N, K), scale fp32 (N,):                     W[n, k] = q[n, k] * scale[n]
          symmetric, one scale per output channel, codes in [-127, 127]
    int4  q uint8 (N, K/2): two codes per byte, the even k in the low nibble; scale fp32 (N, K/G) and zero uint8
          (N, K/G) per group of G consecutive inputs:          W[n, k] = (code[n, k] - zero[n, k//G]) * scale[n, k//G]
          asymmetric, codes in [0, 15]
Leading dimensions (a stack of MoE experts: (E, N, K)) are allowed by dequantize; the GEMMs take one 2-D weight.

The kernel reads x (M, K) once per N-tile and the codes once per M-tile, and never writes a dequantized weight: a
decode step (M = the batch, often 1..16) is bound by the weight bytes it reads, which int8 halves and int4 quarters
against bf16. Per K step it loads a (BK, BN) tile of codes, turns them into small integers ((code - zero) for int4:
in [-15, 15], exact in bf16 / fp16), multiplies on the tensor cores in x's dtype with fp32 accumulation, and applies
the scales in fp32: int4 per K block (BK = G, so one scale per column per block), int8 once in the epilogue. So the
only rounding beyond fp32 accumulation is x's own dtype. Small M first: BM = 16 (the smallest tensor-core tile) with
narrow N tiles for many programs at M <= 16; larger tiles for prefill. int4 needs G to be a power of two >= 16 (a
K block is one group); other group sizes run the reference path.
"""
import os

import torch
import triton
import triton.language as tl

from nanokernels.attention import _dot, _to  # a @ b (+ acc) and the cast to the output dtype, interpreter-safe

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _tune_size(n):
    return triton.next_power_of_2(max(n, 1))


# ------------------------------------------------------------------------------------------------------- reference

def unpack_int4(q):
    """(..., N, K/2) uint8 -> (..., N, K) codes in [0, 15] (uint8): the even k from the low nibble."""
    return torch.stack((q & 0xF, q >> 4), dim=-1).flatten(-2)


def pack_int4(codes):
    """(..., N, K) codes in [0, 15] -> (..., N, K/2) uint8, the inverse of unpack_int4 (K even)."""
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def dequantize(q, scale, zero, bits, group_size, dtype=torch.float32):
    """The weight (..., N, K) the codes stand for, computed in fp32 (float64 if asked) and returned in dtype."""
    acc = torch.promote_types(dtype, torch.float32)
    if bits == 8:
        return (q.to(acc) * scale.to(acc)[..., None]).to(dtype)
    codes = unpack_int4(q).to(acc)
    groups = codes.unflatten(-1, (-1, group_size))                       # (..., N, K/G, G)
    w = (groups - zero.to(acc)[..., None]) * scale.to(acc)[..., None]
    return w.flatten(-2).to(dtype)


def quant_matmul_ref(x, q, scale, zero, bits, group_size):
    """x (M, K) @ W^T in x's dtype (at least fp32 arithmetic): dequantize, then one matmul."""
    acc = torch.promote_types(x.dtype, torch.float32)
    return (x.to(acc) @ dequantize(q, scale, zero, bits, group_size, acc).t()).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------- Triton

def _configs():
    if INTERPRET:
        return [triton.Config({"BM": 16, "BN": 32}, num_warps=4, num_stages=1)]
    # (BM, BN, warps, stages): BM = 16 for decode (mma.sync m16; wgmma wants 64 rows, which a decode step lacks)
    # with narrow N tiles so a 4096-wide layer still gives 64+ programs; 64/128-row tiles for prefill
    shapes = ((16, 32, 4, 4), (16, 64, 4, 4), (16, 128, 4, 3), (32, 64, 4, 4), (64, 64, 4, 3), (64, 128, 4, 3),
              (128, 128, 8, 3))
    return [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]


def _prune(configs, named_args, **kw):
    """Decode shapes (M <= 16) take the 16-row tiles only; larger M the others. int4 holds each K block's product
    beside the accumulator: tiles over 64 x 128 spill (128 x 128 at 8 warps did, compiled for sm_90a)."""
    arg = lambda name: kw.get(name, named_args.get(name))
    small, int4 = arg("TUNE_M") <= 16, arg("BITS") == 4
    kept = [c for c in configs if (c.kwargs["BM"] == 16) == small
            and not (int4 and c.kwargs["BM"] * c.kwargs["BN"] > 64 * 128)]
    return kept or configs


@triton.autotune(configs=_configs(), key=["TUNE_M", "N", "K", "BITS", "BK"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _quant_mm_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, stride_qn, stride_sn, stride_ym, TUNE_M,
                     BITS: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """y = x @ W^T for int8 (scale per row n of W) or int4 (BK = G: scale and zero per row n and K block)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    mask_m, mask_n = offs_m < M, offs_n < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    q_cols = q_ptr + offs_n[None, :].to(tl.int64) * stride_qn                  # (BK, BN) views of W^T
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BK)):
        ks = kb * BK + offs_k
        k_ok = ks < K
        x = tl.load(x_rows + ks[None, :], mask=mask_m[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & mask_n[None, :]
        if BITS == 8:
            w = tl.load(q_cols + ks[:, None], mask=w_mask, other=0)
            acc = _dot(x, w.to(tl.float32).to(x.dtype), acc)
        else:
            packed = tl.load(q_cols + (ks // 2)[:, None], mask=w_mask, other=0)   # each byte read for 2 codes
            codes = (packed >> ((ks % 2) * 4).to(tl.uint8)[:, None]) & 0xF
            zero = tl.load(z_ptr + offs_n * stride_sn + kb, mask=mask_n, other=0)
            scale = tl.load(s_ptr + offs_n * stride_sn + kb, mask=mask_n, other=0.0)
            w = codes.to(tl.int32) - zero.to(tl.int32)[None, :]                    # in [-15, 15]: exact
            acc += _dot(x, w.to(tl.float32).to(x.dtype), None) * scale[None, :]
    if BITS == 8:
        acc *= tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, _to(acc, y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def triton_supports(bits, group_size):
    """Whether the kernel takes this format (int4 groups must be one power-of-two K block of at least 16)."""
    return bits == 8 or (group_size >= 16 and group_size & (group_size - 1) == 0)


def quant_matmul_triton(x, q, scale, zero, bits, group_size):
    """x (M, K) @ W^T -> (M, N) in x's dtype (fp32, bf16 or fp16), W dequantized in the kernel."""
    M, K = x.shape
    N = q.shape[0]
    if not triton_supports(bits, group_size):
        raise ValueError(f"the int4 kernel takes power-of-two groups >= 16, not {group_size}")
    x, q, scale = x.contiguous(), q.contiguous(), scale.contiguous()
    zero = zero.contiguous() if zero is not None else scale  # (unused for int8)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    grid = lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(N, meta["BN"]))
    _quant_mm_kernel[grid](x, q, scale, zero, y, M, N, K, x.stride(0), q.stride(0),
                           scale.stride(0) if bits == 4 else 1, y.stride(0), _tune_size(M),
                           BITS=bits, BK=group_size if bits == 4 else 128)
    return y


def quant_matmul(x, q, scale, zero, bits, group_size):
    """The kernel on a GPU, the reference elsewhere or for a group size the kernel does not take."""
    if x.is_cuda and triton_supports(bits, group_size):
        return quant_matmul_triton(x, q, scale, zero, bits, group_size)
    return quant_matmul_ref(x, q, scale, zero, bits, group_size)
