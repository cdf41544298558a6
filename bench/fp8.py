"""fp8 benchmarks on one GPU (nanokernels/fp8.py), printed as markdown tables:
  1. GEMM TFLOP/s: our Triton kernels (tensor / row / block scaling) next to torch._scaled_mm (tensorwise, rowwise) and
     bf16 torch.matmul, for M=N=K squares and the 7B config's layer GEMMs (forward, grad_x, grad_W);
  2. quantize GB/s against the device's memory bandwidth;
  3. fp8 Linear forward+backward per 7B layer shape, and a whole SwiGLU MLP block, fp8 recipes vs bf16.
    python bench/fp8.py [--quick]
    python bench/fp8.py --sections gemm --squares 8192 --layers none     # one GEMM row: 8192^3
    python bench/fp8.py --sections quantize,linear --layers none         # quantize GB/s and the SwiGLU MLP row
7B shapes (config/train_7b.py): d_model 4096, 32 heads of 128 with one K/V head, SwiGLU hidden 14336, micro-batch
8 x 4096 = 32768 tokens per GPU; weights reach the matmuls in bf16 (FSDP2 param_dtype), as here.
"""
import argparse
import copy
import datetime
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

D, HIDDEN, HEAD, TOKENS = 4096, 14336, 128, 8 * 4096
LAYERS = {"q/o proj": (D, D), "k/v proj (MQA)": (HEAD, D), "gate/up proj": (HIDDEN, D), "down proj": (D, HIDDEN)}
LAYER_KEYS = {"qo": "q/o proj", "kv": "k/v proj (MQA)", "gate_up": "gate/up proj", "down": "down proj"}
SECTIONS = ("gemm", "quantize", "linear")
PEAK_GBPS = [("H200", 4800), ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350), ("GH200", 4000),
             ("B200", 8000), ("L40S", 864), ("L40", 864), ("L4", 300), ("RTX 4090", 1008)]
DEVICE = "cuda"


def fmt(x, digits=1):
    return "n/a" if x is None else f"{x:.{digits}f}"


def table(headers, rows):
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    print()


def bench_ms(fn, **kw):
    """Median ms of fn (after one untimed call, which also runs the autotuner); None if it raises."""
    from triton.testing import do_bench
    try:
        fn()
        return do_bench(fn, **kw)
    except Exception as e:  # e.g. a _scaled_mm variant this torch/cuBLAS build lacks
        print(f"<!-- skipped: {type(e).__name__}: {str(e).splitlines()[0][:100]} -->")
        return None


def tflops(flops, ms):
    return None if ms is None else flops / ms / 1e9


# --------------------------------------------------------------------------------------------------------- GEMM

def gemm_row(fp8, label, M, N, K, b_scaling):
    """One table row: C (M, N) = A (M, K) @ B (N, K)^T in every variant. b_scaling: 'block' for forward / grad_x
    (weights in 128x128 blocks), 'tile' for grad_W (both operands activations/gradients in 1x128 tiles)."""
    a = torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(N, K, device=DEVICE, dtype=torch.bfloat16)
    flops = 2 * M * N * K
    cells = [tflops(flops, bench_ms(lambda: a @ b.t()))]
    ops = {}
    for scaling, (sa_kind, sb_kind) in (("tensor", ("tensor", "tensor")), ("row", ("row", "row")),
                                        ("block", ("tile", b_scaling))):
        qa, sa = fp8.quantize_triton(a, sa_kind)
        qb, sb = fp8.quantize_triton(b, sb_kind)
        ops[scaling] = qa, qb, sa, sb
        cells.append(tflops(flops, bench_ms(lambda: fp8.scaled_mm_triton(qa, qb, sa, sb, scaling))))
    qa, qb, sa, sb = ops["tensor"]
    for fast in (False, True):
        cells.append(tflops(flops, bench_ms(lambda: torch._scaled_mm(
            qa, qb.t(), scale_a=sa.reshape(()), scale_b=sb.reshape(()), out_dtype=torch.bfloat16,
            use_fast_accum=fast))))
    qa, qb, sa, sb = ops["row"]
    cells.append(tflops(flops, bench_ms(lambda: torch._scaled_mm(
        qa, qb.t(), scale_a=sa, scale_b=sb.reshape(1, N), out_dtype=torch.bfloat16))))
    return [label, f"{M}x{N}x{K}"] + [fmt(c) for c in cells]


def bench_gemms(fp8, squares, layers, tokens):
    print("## GEMM TFLOP/s (bf16 output)\n")
    print("Ours: Triton, fp32 accumulation promoted every 128 of K; `block` = A in 1x128 tiles, B in 128x128 blocks "
          "(1x128 tiles for grad_W). `_scaled_mm` = cuBLASLt via torch; fast-accum skips the promotion.\n")
    rows = [gemm_row(fp8, f"square {n}", n, n, n, "block") for n in squares]
    for name, (N, K) in layers.items():
        rows.append(gemm_row(fp8, f"{name} fwd", tokens, N, K, "block"))
        rows.append(gemm_row(fp8, f"{name} grad_x", tokens, K, N, "block"))
        rows.append(gemm_row(fp8, f"{name} grad_W", N, K, tokens, "tile"))
    table(["GEMM", "MxNxK", "bf16 matmul", "ours tensor", "ours row", "ours block", "_scaled_mm tensor",
           "_scaled_mm tensor fast-accum", "_scaled_mm row"], rows)


# ----------------------------------------------------------------------------------------------------- quantize

def bench_quantize(fp8, tokens, peak):
    print("## Quantize GB/s\n")
    print("GB/s = (one read of the input + the fp8 outputs) / time; tensor scaling reads the input twice (amax, then "
          f"cast), row scaling twice per orientation. Peak: {fmt(peak, 0)} GB/s.\n")
    inputs = {f"activation {tokens}x{D} bf16": torch.randn(tokens, D, device=DEVICE, dtype=torch.bfloat16),
              f"weight {HIDDEN}x{D} fp32": torch.randn(HIDDEN, D, device=DEVICE)}
    rows = []
    for name, x in inputs.items():
        for scaling in ("tensor", "row", "tile", "block"):
            for with_t in (False, True):
                ms = bench_ms(lambda: fp8.quantize_triton(x, scaling, fp8.E4M3, with_t))
                moved = x.numel() * (x.element_size() + (2 if with_t else 1))
                gbps = None if ms is None else moved / ms / 1e6
                pct = None if gbps is None or peak is None else 100 * gbps / peak
                rows.append([name, scaling, "q, q^T" if with_t else "q", fmt(ms, 3), fmt(gbps, 0), fmt(pct, 0)])
    table(["input", "scaling", "outputs", "ms", "GB/s", "% of peak"], rows)


# ---------------------------------------------------------------------------------------------- Linear and MLP

def fwd_bwd_ms(module, x):
    gy = torch.randn(*x.shape[:-1], module(x).shape[-1], device=DEVICE, dtype=x.dtype)
    x = x.detach().requires_grad_(True)
    return bench_ms(lambda: module(x).backward(gy), grad_to_none=[x, *module.parameters()])


class SwiGLU(nn.Module):  # as model.py's MLP
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(D, HIDDEN, bias=False)
        self.up_proj = nn.Linear(D, HIDDEN, bias=False)
        self.down_proj = nn.Linear(HIDDEN, D, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def bench_linear(fp8, layers, tokens):
    print(f"## fp8 Linear and SwiGLU MLP, forward + backward, {tokens} tokens, bf16 weights and activations\n")
    recipes = list(fp8.RECIPES)
    rows = []
    cases = [(f"Linear {name} {K}->{N}", nn.Sequential(nn.Linear(K, N, bias=False)), K, 6 * tokens * N * K)
             for name, (N, K) in layers.items()]
    cases.append((f"SwiGLU MLP {D}->{HIDDEN}->{D}", SwiGLU(), D, 18 * tokens * D * HIDDEN))
    for name, module, width, flops in cases:
        module = module.to(DEVICE, torch.bfloat16)
        x = torch.randn(tokens, width, device=DEVICE, dtype=torch.bfloat16)
        base = fwd_bwd_ms(module, x)
        row = [name, f"{fmt(base, 2)} ms / {fmt(tflops(flops, base), 0)}"]
        for recipe in recipes:
            m8 = copy.deepcopy(module)
            fp8.convert_to_fp8(m8, recipe)
            ms = fwd_bwd_ms(m8, x)
            speedup = None if ms is None or base is None else base / ms
            row.append(f"{fmt(ms, 2)} ms / {fmt(tflops(flops, ms), 0)} / {fmt(speedup, 2)}x")
            del m8
        rows.append(row)
    table(["fwd+bwd", "bf16: ms / TFLOP/s"] + [f"{r}: ms / TFLOP/s / speedup" for r in recipes], rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2k/4k squares and 8192 tokens instead of 32768")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"any of {', '.join(SECTIONS)}")
    parser.add_argument("--squares", default="2048,4096,8192,16384", help="M = N = K of the square GEMM rows")
    parser.add_argument("--layers", default="all",
                        help=f"7B layer rows (GEMMs and Linears): all, none, or any of {', '.join(LAYER_KEYS)}")
    parser.add_argument("--tokens", type=int, default=TOKENS, help="tokens per layer GEMM / Linear / MLP")
    args = parser.parse_args()
    sections = args.sections.split(",")
    names = {"all": list(LAYER_KEYS), "none": []}.get(args.layers, args.layers.split(","))
    bad = [x for x in sections if x not in SECTIONS] + [x for x in names if x not in LAYER_KEYS]
    if bad:
        parser.error(f"unknown sections or layers {bad}")
    layers = {LAYER_KEYS[n]: LAYERS[LAYER_KEYS[n]] for n in names}
    squares = [int(n) for n in args.squares.split(",") if n]
    tokens = args.tokens
    if args.quick:
        squares, tokens = [2048, 4096], 8192
    if not torch.cuda.is_available():
        print("bench/fp8.py needs CUDA (a GPU with fp8 tensor cores, compute capability >= 8.9); nothing to run here.")
        return
    cap = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    if cap < (8, 9):
        print(f"bench/fp8.py needs fp8 tensor cores (compute capability >= 8.9); {name} is {cap[0]}.{cap[1]}.")
        return
    import triton

    from nanokernels import fp8
    peak = next((gbps for key, gbps in PEAK_GBPS if key in name), None)
    print(f"# fp8 benchmarks: {name} (sm_{cap[0]}{cap[1]}), {datetime.date.today()}, torch {torch.__version__}, "
          f"triton {triton.__version__}\n\ncommand: `python {' '.join(sys.argv)}`\n")
    if "gemm" in sections:
        bench_gemms(fp8, squares, layers, tokens)
    if "quantize" in sections:
        bench_quantize(fp8, tokens, peak)
    if "linear" in sections:
        bench_linear(fp8, layers, tokens)


if __name__ == "__main__":
    main()
