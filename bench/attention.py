"""Attention throughput on one GPU: kernels/attention.py next to PyTorch SDPA (each backend) and FlexAttention.

    python bench/attention.py            # T in 1k..16k, D in {64, 128}, Hkv in {1, 8}, window in {none, 1024}
    python bench/attention.py --quick    # T in {1k, 4k}, D = 128, Hkv = 8

Every configuration holds B * T = 16k tokens and Hq * D = 2048 (Hq = 32 at D = 64, 16 at D = 128), causal, bf16.
FLOPs follow FlashAttention's convention, counted over the (query, key) pairs a causal or sliding-window mask
leaves visible: forward 4 * B * Hq * D * pairs (two matmuls), backward 2.5x that. A provider that computes every
pair under an explicit mask (SDPA with a window) is credited with the visible pairs only, i.e. effective TFLOP/s.
Prints a markdown table; 'n/a' means the backend refused the inputs, 'oom' that it ran out of memory.
"""
import argparse
import datetime
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
PROVIDERS = ("triton",) + tuple(f"sdpa-{b}" for b in SDPA_BACKENDS) + ("flex",)


def visible_pairs(T, window):
    """Number of (query, key) pairs with i - window < j <= i, 0 <= j <= i < T."""
    if window is None or window >= T:
        return T * (T + 1) // 2
    return window * (window + 1) // 2 + (T - window) * window


def forward_flops(B, Hq, T, D, window):
    return 4 * B * Hq * D * visible_pairs(T, window)


class Unavailable(Exception):
    pass


def make_attention(provider, q, k, v, window):
    """A zero-argument callable computing causal (windowed) attention of q over k, v with `provider`."""
    T, gqa = q.size(2), q.size(1) != k.size(1)
    if provider == "triton":
        from kernels.attention import flash_attention
        return lambda: flash_attention(q, k, v, window)
    if provider.startswith("sdpa-"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[provider[5:]]
        if window is None:
            kwargs = dict(is_causal=True)
        elif provider == "sdpa-flash":
            raise Unavailable("no mask support")
        else:
            i = torch.arange(T, device=q.device)
            kwargs = dict(attn_mask=(i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window))

        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, **kwargs)
        return run
    if provider == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def visible(b, h, i, j):
            return (j <= i) if window is None else (j <= i) & (j > i - window)
        block_mask = create_block_mask(visible, B=None, H=None, Q_LEN=T, KV_LEN=T, device=q.device)
        flex = _compiled_flex(flex_attention)
        return lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    raise ValueError(f"unknown provider {provider}")


_FLEX = None


def _compiled_flex(flex_attention):
    global _FLEX
    if _FLEX is None:
        import torch._dynamo
        for name in ("recompile_limit", "cache_size_limit"):  # one compile per shape; allow the whole grid
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 256)
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def time_provider(provider, q, k, v, window, backward):
    """(forward ms, backward ms) with triton.testing.do_bench (median); backward ms is None if not asked."""
    from triton.testing import do_bench
    fn = make_attention(provider, q, k, v, window)
    out = fn()  # compiles / autotunes, and fails here if the backend refuses
    fwd = do_bench(fn, warmup=25, rep=100, return_mode="median")
    bwd = None
    if backward:
        do = torch.randn_like(out)
        out.backward(do, retain_graph=True)  # the backward's own compile / autotune
        bwd = do_bench(lambda: out.backward(do, retain_graph=True), warmup=25, rep=100, grad_to_none=[q, k, v],
                       return_mode="median")
    return fwd, bwd


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="T in {1k, 4k}, D = 128, Hkv = 8, triton / sdpa-flash / flex")
    p.add_argument("--seq-lens", default="1024,2048,4096,8192,16384")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--kv-heads", default="1,8")
    p.add_argument("--windows", default="none,1024", help="comma-separated, 'none' = plain causal")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--tokens", type=int, default=16384, help="B * T per configuration")
    p.add_argument("--width", type=int, default=2048, help="Hq * D per configuration")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--no-backward", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.seq_lens, args.head_dims, args.kv_heads, args.providers = "1024,4096", "128", "8", "triton,sdpa-flash,flex"

    if not torch.cuda.is_available():
        print("bench/attention.py needs a CUDA GPU and found none: no figures measured here.\n"
              "GPU figures are owed: run `python bench/attention.py` (or --quick) on an H100 and paste the table.")
        return

    import triton
    dtype = getattr(torch, args.dtype)
    providers = args.providers.split(",")
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    windows = [None if w == "none" else int(w) for w in args.windows.split(",")]
    print(f"## Causal attention, {torch.cuda.get_device_name()}, {datetime.date.today()}\n")
    print(f"torch {torch.__version__}, triton {triton.__version__}, {args.dtype}, B*T = {args.tokens}, "
          f"Hq*D = {args.width}; TFLOP/s (FlashAttention FLOPs over visible pairs; backward = 2.5x forward)\n")
    print("| T | B | Hq | Hkv | D | window | pass | " + " | ".join(providers) + " |")
    print("|" + "---|" * (7 + len(providers)))
    for D in ints(args.head_dims):
        Hq = args.width // D
        for Hkv in ints(args.kv_heads):
            for window in windows:
                for T in ints(args.seq_lens):
                    B = max(1, args.tokens // T)
                    flops = forward_flops(B, Hq, T, D, window)
                    cells = {"fwd": [], "bwd": []}
                    for provider in providers:
                        torch.manual_seed(0)
                        q = torch.randn(B, Hq, T, D, device="cuda", dtype=dtype, requires_grad=True)
                        k, v = (torch.randn(B, Hkv, T, D, device="cuda", dtype=dtype, requires_grad=True)
                                for _ in range(2))
                        try:
                            fwd, bwd = time_provider(provider, q, k, v, window, not args.no_backward)
                            cells["fwd"].append(f"{flops / fwd * 1e-9:.1f}")
                            cells["bwd"].append("-" if bwd is None else f"{2.5 * flops / bwd * 1e-9:.1f}")
                        except torch.cuda.OutOfMemoryError:
                            cells["fwd"].append("oom")
                            cells["bwd"].append("oom")
                        except Exception as e:  # a backend that refuses these inputs: report, keep going
                            reason = str(e).strip().split("\n")[0][:80] or type(e).__name__
                            print(f"<!-- {provider} T={T} D={D} Hkv={Hkv} window={window}: {reason} -->",
                                  file=sys.stderr)
                            cells["fwd"].append("n/a")
                            cells["bwd"].append("n/a")
                        del q, k, v
                        torch.cuda.empty_cache()
                    for pass_ in ("fwd", "bwd") if not args.no_backward else ("fwd",):
                        print(f"| {T} | {B} | {Hq} | {Hkv} | {D} | {window or 'causal'} | {pass_} | "
                              + " | ".join(cells[pass_]) + " |", flush=True)


if __name__ == "__main__":
    main()
