"""Weight-only quantization, printed as markdown tables:
  models  (CPU or GPU) one float checkpoint as it is, quantized by nanogpt/quant.py to int8 and int4 (groups of 128,
          and a symmetric int4 variant for the zero points' sake), and by torchao's int8 weight-only when torchao is
          installed (an independent implementation of the int8 scheme): weight bytes, the mean relative RMS error of
          the quantized block weights, and the validation loss (mean cross-entropy over the first --windows
          non-overlapping block_size windows of the dataset's val shard) with its change against the float model.
  gemm    (CUDA) the fused int8 / int4 GEMM (nanokernels/quant_gemm.py) against bf16 F.linear and against
          dequantize-then-matmul, at decode (M = 1, 16) and prefill (M = 2048) shapes of a 4096-wide layer: time,
          weight GB/s and the error against the float64 product.

    python bench/quant.py --sections models --model=out --data_dir=data/shakespeare_char
    python bench/quant.py --sections gemm                   # needs CUDA; elsewhere it says so and exits
    python bench/quant.py --sections gemm --shapes 4096x4096,11008x4096 --ms 1,4,16,2048

The quantized checkpoints' file sizes and evaluations come from tools/quantize.py, eval.py and eval_mmlu.py
(bench/RESULTS.md has the commands).
"""
import argparse
import copy
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanogpt.checkpoint import load_model  # noqa: E402
from nanogpt.quant import model_bytes, quantize_model, quantized_names  # noqa: E402
from nanogpt.shards import read_shard, shard_paths  # noqa: E402
from nanokernels.quant_gemm import dequantize  # noqa: E402

SECTIONS = ("models", "gemm")


# --------------------------------------------------------------------------------------------------------- models

def val_windows(data_dir, block_size, windows):
    """(x, y) for the first `windows` non-overlapping windows of block_size + 1 tokens of the val shard."""
    tokens = np.asarray(read_shard(shard_paths(data_dir, "val")[0]), dtype=np.int64)
    n = min(windows, (len(tokens) - 1) // block_size)
    rows = torch.from_numpy(tokens[:n * block_size + 1])
    return rows[:-1].view(n, block_size), rows[1:].view(n, block_size)


@torch.no_grad()
def val_loss(model, x, y, batch=16):
    total = sum(model(x[i:i + batch], targets=y[i:i + batch])[0].item() for i in range(0, len(x), batch))
    return total / y.numel()


def symmetric_int4(model, group):
    """The float model with every block weight replaced by its symmetric int4 round trip (codes -7..7, one scale
    per group): the scheme nanogpt/quant.py did not choose, for its error."""
    twin = copy.deepcopy(model)
    for name in quantized_names(twin):
        owner, param = name.rsplit(".", 1)
        w = getattr(twin.get_submodule(owner), param)
        groups = w.detach().unflatten(-1, (-1, group))
        scale = (groups.abs().amax(-1, keepdim=True) / 7).clamp(min=1e-12)
        w.data = ((groups / scale).round().clamp(-7, 7) * scale).flatten(-2)
    return twin


def weight_error(model, other):
    """Mean over the quantized block weights of ||W' - W|| / ||W|| (ours dequantize when read through .weight)."""
    errors = []
    for name in quantized_names(model):
        owner, param = name.rsplit(".", 1)
        w = getattr(model.get_submodule(owner), param).double()
        theirs = getattr(other.get_submodule(owner), param)
        theirs = theirs.dequantize() if hasattr(theirs, "qdata") else theirs  # a torchao tensor
        errors.append(((theirs.double() - w).norm() / w.norm()).item())
    return sum(errors) / len(errors)


def models_section(args):
    model, _, _ = load_model(args.model, "cpu")
    x, y = val_windows(args.data_dir, model.config.block_size, args.windows)
    variants = {"float32 (as trained)": model}
    for scheme, group in (("int8", 128), ("int4", args.group_size)):
        q = copy.deepcopy(model)
        quantize_model(q, scheme, group, head=args.head)
        variants[f"{scheme}{f' g{group}' if scheme == 'int4' else ''} (nanogpt/quant.py)"] = q
    variants[f"int4 g{args.group_size} symmetric (not chosen)"] = symmetric_int4(model, args.group_size)
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
        ao = copy.deepcopy(model)
        quantize_(ao.blocks, Int8WeightOnlyConfig(), filter_fn=lambda m, name: isinstance(m, torch.nn.Linear)
                  and not name.endswith("router"))
        variants["int8 (torchao Int8WeightOnlyConfig)"] = ao
    except ImportError:
        print("(torchao is not installed: its row is left out)")
    print(f"\n{args.model}: {model.num_params():,} parameters; val loss over {len(x)} windows of "
          f"{model.config.block_size} tokens of {args.data_dir}; head {'quantized' if args.head else 'float'}\n")
    print("| variant | weights MiB | rel. weight error | val loss | vs float | seconds |")
    print("|---|---|---|---|---|---|")
    base = None
    for name, m in variants.items():
        t0 = time.time()
        loss = val_loss(m, x, y)
        base = loss if base is None else base
        size = f"{model_bytes(m) / 2**20:.2f}" if "torchao" not in name and "symmetric" not in name else "-"
        error = 0.0 if m is model else weight_error(model, m)
        print(f"| {name} | {size} | {error:.4f} | {loss:.4f} | {loss - base:+.4f} | {time.time() - t0:.1f} |",
              flush=True)


# ----------------------------------------------------------------------------------------------------------- gemm

def gemm_section(args):
    from triton.testing import do_bench

    from nanogpt.quant import QuantWeight
    from nanokernels.quant_gemm import quant_matmul_triton
    print("\n| M | N x K | way | us | weight GB/s | max rel. error vs float64 |")
    print("|---|---|---|---|---|---|")
    for N, K in (tuple(map(int, shape.split("x"))) for shape in args.shapes.split(",")):
        w = torch.randn(N, K, device="cuda") * 0.02
        quantized = {s: QuantWeight.from_float(w, s, 128) for s in ("int8", "int4")}
        for M in map(int, args.ms.split(",")):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            wb = w.to(torch.bfloat16)
            ways = {"bf16 F.linear": (lambda x=x, wb=wb: F.linear(x, wb), wb.numel() * 2, wb.double())}
            for s, q in quantized.items():
                deq = q.dequantize(torch.float64)
                ways[f"{s} fused"] = (lambda q=q, x=x: quant_matmul_triton(x, q.qdata, q.scale, q.zero, q.bits, 128),
                                      q.qdata.numel() * q.qdata.element_size(), deq)
                ways[f"{s} dequantize + matmul"] = (
                    lambda q=q, x=x: F.linear(x, dequantize(q.qdata, q.scale, q.zero, q.bits, 128, torch.bfloat16)),
                    q.qdata.numel() * q.qdata.element_size(), deq)
            for way, (fn, nbytes, ref_w) in ways.items():
                ref = x.double() @ ref_w.t()
                err = ((fn().double() - ref).abs().max() / ref.abs().max()).item()
                us = do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3
                print(f"| {M} | {N} x {K} | {way} | {us:.1f} | {nbytes / us / 1e3:.0f} | {err:.1e} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="models", help=f"any of {', '.join(SECTIONS)}")
    parser.add_argument("--model", default="out", help="models: the float checkpoint")
    parser.add_argument("--data_dir", default="data/shakespeare_char", help="models: the dataset with val shards")
    parser.add_argument("--windows", type=int, default=64, help="models: val windows of block_size tokens")
    parser.add_argument("--group_size", type=int, default=128, help="models: int4 group size")
    parser.add_argument("--head", action="store_true", help="models: quantize the head too")
    parser.add_argument("--shapes", default="4096x4096", help="gemm: N x K of the weights, comma-separated")
    parser.add_argument("--ms", default="1,16,2048", help="gemm: M (tokens) per GEMM, comma-separated")
    args = parser.parse_args()
    sections = args.sections.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}: choose from {', '.join(SECTIONS)}")
    if "gemm" in sections and not torch.cuda.is_available():
        print("bench/quant.py --sections gemm needs a CUDA GPU; none here")
        sections.remove("gemm")
    torch.manual_seed(0)
    try:
        if "models" in sections:
            models_section(args)
        if "gemm" in sections:
            gemm_section(args)
    except (OSError, ValueError, RuntimeError) as e:
        raise SystemExit(str(e))


if __name__ == "__main__":
    main()
