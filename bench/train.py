"""Training throughput on one GPU: tokens/s and MFU for a ~1B dense model and the 7B shape with fewer layers,
bf16 against fp8, AdamW against Muon, torch.compile on. MFU counts attention FLOPs over the keys each query really
sees. The optimizer column is the share of the step spent in optimizer.step() (timed with the GPU synchronized
around it): for Muon, mostly its Newton-Schulz iterations.

    python bench/train.py                       # both models, bf16 and fp8, AdamW and Muon
    python bench/train.py --models 1b --steps 30 --no-fp8 --optimizers muon

Prints a Markdown table (device, date, command). Needs CUDA; elsewhere it says so and exits.
"""
import argparse
import datetime
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GPT, GPTConfig  # noqa: E402
from nanogpt.optim import OPTIMIZERS, build_optimizer  # noqa: E402
from nanogpt.runtime import peak_flops  # noqa: E402

MODELS = {
    # ~1.2B dense: Llama-style widths, GQA-4
    "1b": dict(n_layer=20, n_embd=2048, n_head=16, n_kv_head=4, mlp="swiglu", mlp_hidden=5632, block_size=2048,
               batch=8),
    # the 7B config's layer shape, 4 layers deep so it fits one GPU with its optimizer
    "7b-4layers": dict(n_layer=4, n_embd=4096, n_head=32, n_kv_head=1, mlp="swiglu", mlp_hidden=14336,
                       attn_pattern="LLLLLG", local_window=1024, kv_share=2, share_global_kv=True, block_size=4096,
                       batch=4),
}


def bench(name, fp8, optimizer_name, steps, warmup):
    spec = dict(MODELS[name])
    batch = spec.pop("batch")
    cfg = GPTConfig(vocab_size=50304, **spec)
    raw = GPT(cfg, attn_impl="triton").cuda()  # the kernel is the process's choice, not the config's
    if fp8:
        raw.convert_fp8("tensorwise")
    model = torch.compile(raw)
    optimizer = build_optimizer(optimizer_name, raw, 1e-4, 0.1, (0.9, 0.95), {}, "cuda")
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device="cuda")
    optimizer_s = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            t0, optimizer_s = time.perf_counter(), 0.0
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ce, balance = model(x, x)
            loss = ce / x.numel() + balance
        loss.backward()
        torch.cuda.synchronize()
        t_opt = time.perf_counter()
        optimizer.step()
        torch.cuda.synchronize()
        optimizer_s += time.perf_counter() - t_opt
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    tokens_per_s = batch * cfg.block_size / dt
    peak = peak_flops("cuda") or float("nan")  # 0.0 for a GPU nanogpt/runtime.py has no figure for
    mfu = raw.flops_per_token(cfg.block_size) * tokens_per_s / peak
    result = dict(ms=dt * 1000, tokens_per_s=tokens_per_s, mfu=mfu, memory=torch.cuda.max_memory_allocated() / 2**30,
                  optimizer_share=optimizer_s / steps / dt)
    del model, raw, optimizer
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="1b,7b-4layers")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-fp8", action="store_true")
    parser.add_argument("--optimizers", default="adamw,muon", help="comma-separated: " + ", ".join(OPTIMIZERS))
    args = parser.parse_args()
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    unknown = [o for o in args.optimizers.split(",") if o not in OPTIMIZERS]
    if unknown:
        parser.error(f"unknown optimizers {unknown}; choose from {', '.join(OPTIMIZERS)}")
    if not torch.cuda.is_available():
        print("bench/train.py needs CUDA: no GPU here. The figures owed are listed in bench/RESULTS.md.")
        return
    print(f"# Training throughput, {torch.cuda.get_device_name()}, {datetime.date.today()}, torch {torch.__version__}")
    print(f"\ncommand: `python {' '.join(sys.argv)}`\n")
    print("| model | matmuls | optimizer | ms/step | tokens/s | MFU | optimizer share | peak memory |\n"
          "|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for fp8 in ([False] if args.no_fp8 else [False, True]):
            for opt in args.optimizers.split(","):
                r = bench(name, fp8, opt, args.steps, args.warmup)
                print(f"| {name} | {'fp8' if fp8 else 'bf16'} | {opt} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} | "
                      f"{100 * r['mfu']:.1f}% | {100 * r['optimizer_share']:.1f}% | {r['memory']:.1f} GiB |")


if __name__ == "__main__":
    main()
