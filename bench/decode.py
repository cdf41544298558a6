"""Decode speed on one GPU, printed as markdown tables:
  1. the attention of one decode step for the 7B config's shape (32 query heads of 128 on one K/V head, bf16):
     flash_decode (nanokernels/attention.py) against the prefill kernel at Tq = 1 and SDPA, in microseconds and in
     GB/s of K/V read (decode attention is memory-bound: every cached key and value is read once per step);
  2. tokens/s of the KV-cached generation loop (model.py's, as sample.py runs it) for the 7B shape with fewer layers,
     attention by the Triton kernels against SDPA.

    python bench/decode.py                                    # contexts 1024 and 8192
    python bench/decode.py --contexts 4096 --layers 6 --steps 50 --sections kernel

Needs CUDA; elsewhere it says so and exits (after checking its arguments).
"""
import argparse
import datetime
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GPT, GPTConfig, KVCache  # noqa: E402

HQ, HKV, D = 32, 1, 128  # config/train_7b.py's attention


def kernel_rows(contexts, batch):
    """One row per context: microseconds and K/V GB/s of each way of attending one new query per sequence."""
    from triton.testing import do_bench

    from nanokernels.attention import flash_attention, flash_decode
    rows = []
    for ctx in contexts:
        q = torch.randn(batch, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(batch, HKV, ctx, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        ways = {"flash_decode": lambda: flash_decode(q, k, v),
                "flash_attention (Tq = 1)": lambda: flash_attention(q, k, v),
                "SDPA": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)}
        ref = ways["SDPA"]()
        cells = [str(ctx)]
        for fn in ways.values():
            err = (fn().float() - ref.float()).abs().max().item()
            us = do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
            gbps = 2 * k.numel() * k.element_size() / us / 1e3
            cells.append(f"{us:.1f} us / {gbps:.0f} GB/s / err {err:.1e}")
        rows.append(cells)
    return list(ways), rows


def tokens_per_s(cfg, impl, context, batch, steps):
    """Tokens/s of `steps` cached decode steps after a prefill of `context` tokens (model.py's cache, bf16)."""
    torch.manual_seed(0)
    model = GPT(cfg, attn_impl=impl).to("cuda", torch.bfloat16).eval()
    idx = torch.randint(0, cfg.vocab_size, (batch, context), device="cuda")
    with torch.no_grad():
        cache = KVCache(cfg)
        logits = model.logits(model(idx, cache=cache)[:, -1])
        token = logits.argmax(-1, keepdim=True)
        for i in range(steps + 3):  # three warm-up steps (compiles / autotunes the decode kernels)
            if i == 3:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            logits = model.logits(model(token, cache=cache)[:, -1])
            token = logits.argmax(-1, keepdim=True)
        torch.cuda.synchronize()
    del model, cache
    torch.cuda.empty_cache()
    return batch * steps / (time.perf_counter() - t0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="1024,8192", help="cached positions before the timed steps")
    parser.add_argument("--sections", default="kernel,model", help="kernel, model or both")
    parser.add_argument("--layers", type=int, default=6, help="layers of the 7B shape (LLLLLG: 6 = one global)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per context")
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    sections = set(args.sections.split(","))
    if not sections <= {"kernel", "model"}:
        parser.error(f"--sections takes kernel and/or model, got {args.sections!r}")
    if not torch.cuda.is_available():
        print("bench/decode.py needs CUDA: no GPU here. The figures owed are listed in bench/RESULTS.md.")
        return
    import triton
    print(f"# Decode, {torch.cuda.get_device_name()}, {datetime.date.today()}, torch {torch.__version__}, "
          f"triton {triton.__version__}\n\ncommand: `python {' '.join(sys.argv)}`\n")
    if "kernel" in sections:
        ways, rows = kernel_rows(contexts, args.batch)
        print(f"## One decode step's attention: B = {args.batch}, {HQ} query heads, {HKV} K/V head, D = {D}, bf16"
              " (median; GB/s of K/V read; err = max |out - SDPA|)\n")
        print("| context | " + " | ".join(ways) + " |\n|" + "---|" * (len(ways) + 1))
        for row in rows:
            print("| " + " | ".join(row) + " |")
        print()
    if "model" in sections:
        print(f"## Cached generation, 7B shape with {args.layers} layers (LLLLLG, window 1024, KV shared in pairs), "
              f"batch {args.batch}, {args.steps} steps\n")
        print("| context | SDPA tokens/s | Triton tokens/s |\n|---|---|---|")
        for ctx in contexts:
            cfg = GPTConfig(vocab_size=50304, n_layer=args.layers, n_embd=HQ * D, n_head=HQ, n_kv_head=HKV,
                            mlp="swiglu", mlp_hidden=14336, attn_pattern="LLLLLG", local_window=1024, kv_share=2,
                            share_global_kv=True, block_size=ctx + args.steps + 4)
            sdpa, tri = (tokens_per_s(cfg, impl, ctx, args.batch, args.steps) for impl in ("sdpa", "triton"))
            print(f"| {ctx} | {sdpa:,.0f} | {tri:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
