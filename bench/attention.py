"""Attention throughput on one GPU: nanokernels/attention.py next to PyTorch SDPA (each backend) and FlexAttention.

    python bench/attention.py            # T in 1k..16k, D in {64, 128}, Hkv in {1, 8}, window in {none, 1024}
    python bench/attention.py --quick    # T in {1k, 4k}, D = 128, Hkv = 8
    python bench/attention.py --seq-lens 8192 --head-dims 128 --kv-heads 8,1 --windows none \
        --providers triton,triton-deterministic,sdpa-flash,sdpa-cudnn      # one row per Hkv, with max errors

Every configuration holds B * T = 16k tokens and Hq * D = 2048 (Hq = 32 at D = 64, 16 at D = 128), causal, bf16.
FLOPs follow FlashAttention's convention, counted over the (query, key) pairs a causal or sliding-window mask
leaves visible: forward 4 * B * Hq * D * pairs (two matmuls), backward 2.5x that. A provider that computes every
pair under an explicit mask (SDPA with a window) is credited with the visible pairs only, i.e. effective TFLOP/s.
triton-deterministic is the atomic-free backward (separate dQ kernel). Each configuration also gets an "err" row:
max |out - ref| (fwd) and the largest max |grad - ref grad| over q, k, v (bwd), ref = the first SDPA provider
that ran. Prints a markdown table; 'n/a' means the backend refused the inputs, 'oom' that it ran out of memory.
"""
import argparse
import datetime
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanokernels.mask import attention_mask, visible_pairs  # noqa: E402

SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
PROVIDERS = ("triton", "triton-deterministic") + tuple(f"sdpa-{b}" for b in SDPA_BACKENDS) + ("flex",)


def forward_flops(B, Hq, T, D, window):
    return 4 * B * Hq * D * visible_pairs(T, window)


class Unavailable(Exception):
    pass


def make_attention(provider, q, k, v, window):
    """A zero-argument callable computing causal (windowed) attention of q over k, v with `provider`."""
    T, gqa = q.size(2), q.size(1) != k.size(1)
    if provider.startswith("triton"):
        from nanokernels.attention import flash_attention
        return lambda: flash_attention(q, k, v, window, deterministic=provider == "triton-deterministic")
    if provider.startswith("sdpa-"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[provider[5:]]
        if window is None:
            kwargs = dict(is_causal=True)
        elif provider == "sdpa-flash":
            raise Unavailable("no mask support")
        else:
            kwargs = dict(attn_mask=attention_mask(T, T, window, q.device))

        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, **kwargs)
        return run
    if provider == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        # model.attention_mask's rule in FlexAttention's in-kernel form: a captured dense mask would be gathered
        # per element and slow Flex down
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
    """(forward ms, backward ms or None, output, gradients or None), timed with triton.testing.do_bench (median)."""
    from triton.testing import do_bench
    fn = make_attention(provider, q, k, v, window)
    out = fn()  # compiles / autotunes, and fails here if the backend refuses
    fwd = do_bench(fn, warmup=25, rep=100, return_mode="median")
    if not backward:
        return fwd, None, out.detach(), None
    do = torch.randn_like(out)  # the same for every provider: each draws q, k, v, dO after manual_seed(0)
    grads = torch.autograd.grad(out, (q, k, v), do, retain_graph=True)  # the backward's own compile / autotune
    bwd = do_bench(lambda: out.backward(do, retain_graph=True), warmup=25, rep=100, grad_to_none=[q, k, v],
                   return_mode="median")
    return fwd, bwd, out.detach(), grads


def max_errors(result, ref):
    """(forward, backward) max abs differences of a provider's result from the reference provider's."""
    fwd = (result[2].float() - ref[2].float()).abs().max().item()
    if result[3] is None or ref[3] is None:
        return fwd, None
    return fwd, max((a.float() - b.float()).abs().max().item() for a, b in zip(result[3], ref[3]))


def config_rows(providers, B, Hq, Hkv, T, D, window, dtype, backward):
    """The fwd, bwd and err cells of one configuration, one per provider."""
    flops = forward_flops(B, Hq, T, D, window)
    results = {}
    for provider in providers:
        torch.manual_seed(0)  # every provider gets the same inputs
        q = torch.randn(B, Hq, T, D, device="cuda", dtype=dtype, requires_grad=True)
        k, v = (torch.randn(B, Hkv, T, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
        try:
            results[provider] = time_provider(provider, q, k, v, window, backward)
        except torch.cuda.OutOfMemoryError:
            results[provider] = "oom"
        except Exception as e:  # a backend that refuses these inputs: report, keep going
            reason = str(e).strip().split("\n")[0][:80] or type(e).__name__
            print(f"<!-- {provider} T={T} D={D} Hkv={Hkv} window={window}: {reason} -->", file=sys.stderr)
            results[provider] = "n/a"
        del q, k, v
        torch.cuda.empty_cache()
    ref = next((r for p, r in results.items() if p.startswith("sdpa") and isinstance(r, tuple)), None)
    cells = {"fwd": [], "bwd": [], "err": []}
    for provider in providers:
        r = results[provider]
        if not isinstance(r, tuple):
            cells["fwd"].append(r), cells["bwd"].append(r), cells["err"].append(r)
            continue
        cells["fwd"].append(f"{flops / r[0] * 1e-9:.1f}")
        cells["bwd"].append("-" if r[1] is None else f"{2.5 * flops / r[1] * 1e-9:.1f}")
        errs = max_errors(r, ref) if ref is not None else (None, None)
        cells["err"].append(" / ".join("-" if e is None else f"{e:.1e}" for e in errs))
    return cells


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
    providers = args.providers.split(",")
    unknown = [x for x in providers if x not in PROVIDERS]
    if unknown:
        p.error(f"unknown providers {unknown}; choose from {', '.join(PROVIDERS)}")
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    windows = [None if w == "none" else int(w) for w in args.windows.split(",")]
    seq_lens, head_dims, kv_heads = ints(args.seq_lens), ints(args.head_dims), ints(args.kv_heads)

    if not torch.cuda.is_available():
        print("bench/attention.py needs a CUDA GPU and found none: no figures measured here.\n"
              "GPU figures are owed: run `python bench/attention.py` (or --quick) on an H100 and paste the table.")
        return

    import triton
    dtype = getattr(torch, args.dtype)
    print(f"## Causal attention, {torch.cuda.get_device_name()}, {datetime.date.today()}\n")
    print(f"torch {torch.__version__}, triton {triton.__version__}, {args.dtype}, B*T = {args.tokens}, "
          f"Hq*D = {args.width}; TFLOP/s (FlashAttention FLOPs over visible pairs; backward = 2.5x forward); "
          "err: max abs error fwd / bwd against the first SDPA provider\n")
    print("| T | B | Hq | Hkv | D | window | pass | " + " | ".join(providers) + " |")
    print("|" + "---|" * (7 + len(providers)))
    for D in head_dims:
        Hq = args.width // D
        for Hkv in kv_heads:
            for window in windows:
                for T in seq_lens:
                    B = max(1, args.tokens // T)
                    cells = config_rows(providers, B, Hq, Hkv, T, D, window, dtype, not args.no_backward)
                    for pass_ in ("fwd", "bwd", "err") if not args.no_backward else ("fwd", "err"):
                        print(f"| {T} | {B} | {Hq} | {Hkv} | {D} | {window or 'causal'} | {pass_} | "
                              + " | ".join(cells[pass_]) + " |", flush=True)


if __name__ == "__main__":
    main()
