"""Which gradient of the Triton attention is wrong, on which shape, layout and kernel config (a GPU diagnostic).

    python bench/attention_grads.py            # on a GPU: the cases below, most telling first
    python bench/attention_grads.py --small    # the same flow at small shapes (TRITON_INTERPRET=1 on a CPU)

Each line: relative error ||x - ref|| / ||ref|| of out, dq, dk, dv against attention_reference in fp32, for the
first call (which autotunes) and a second call, and where the largest error of each gradient sits (b, h, t).
Then the first case again with plain loads instead of TMA descriptors, with one query head per dK/dV program, and
with the dQ and dK/dV kernels pinned to one config at a time.
"""
import argparse
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanokernels import attention as A  # noqa: E402


def make(B, H, T, D, dtype, layout, device):
    if layout == "bthd":
        return torch.randn(B, T, H, D, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
    return torch.randn(B, H, T, D, device=device, dtype=dtype).requires_grad_()


def located(x, r):
    """'rel / max at (b, h, t) / rows over a tenth of the max: first..last (count)'."""
    diff = (x.float() - r).abs()
    rel = (diff.norm() / r.norm()).item()
    per_row = diff.amax(-1)  # (B, H, T)
    top = per_row.max().item()
    b, h, t = (int(i) for i in torch.unravel_index(per_row.argmax(), per_row.shape))
    bad = (per_row > 0.1 * top).nonzero()[:, 2] if top > 0 else torch.zeros(0)
    span = f"{int(bad.min())}..{int(bad.max())} ({bad.numel()})" if bad.numel() else "-"
    return f"{rel:.1e} max {top:.1e} @b{b} h{h} t{t} rows {span}"


def case(label, B, Hq, Hkv, T, D, window, dtype, layout, device, deterministic=False, second=True):
    torch.manual_seed(0)
    q = make(B, Hq, T, D, dtype, layout, device)
    k, v = (make(B, Hkv, T, D, dtype, layout, device) for _ in range(2))
    start = time.time()
    out = A.flash_attention(q, k, v, window, deterministic)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    grads2 = torch.autograd.grad(A.flash_attention(q, k, v, window, deterministic), (q, k, v), do) if second else None
    torch.cuda.synchronize() if device == "cuda" else None
    took = time.time() - start
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = A.attention_reference(q32, k32, v32, window)
    refs = torch.autograd.grad(ref, (q32, k32, v32), do.float())
    print(f"{label}: B{B} Hq{Hq} Hkv{Hkv} T{T} D{D} w{window} {str(dtype)[6:]} {layout} det={deterministic} "
          f"({took:.0f} s) out {located(out, ref.detach()).split(' max')[0]}")
    for i, name in enumerate(("dq", "dk", "dv")):
        again = f" | 2nd {located(grads2[i], refs[i]).split(' max')[0]}" if second else ""
        print(f"    {name} {located(grads[i], refs[i])}{again}")
    del q, k, v, out, grads, grads2, ref, refs, q32, k32, v32
    if device == "cuda":
        torch.cuda.empty_cache()


def short(config):
    if config is None:
        return "-"
    return f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']} w{config.num_warps} s{config.num_stages}"


def chosen():
    names = ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel")
    return ", ".join(f"{n[1:]} {short(getattr(getattr(A, n), 'best_config', None))}" for n in names)


def pinned(kernel_name, shapes, first):
    """Run the first case once per config of one kernel that fits its head dim with TMA loads (the others
    autotuned as usual)."""
    tuner = getattr(A, kernel_name)
    head_dim = first[4]
    fits = [(m, n, w, s) for m, n, w, s, d, _ in shapes if d >= head_dim]
    for config in tuner.configs:
        if (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages) not in fits:
            continue
        setattr(A, kernel_name, triton.autotune([config], key=list(tuner.keys))(tuner.fn))
        try:
            case(f"{kernel_name} pinned {short(config)}", *first, second=False)
        except Exception as e:  # a config that does not fit this head dim: say so, go on
            print(f"{kernel_name} pinned {short(config)}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
        finally:
            setattr(A, kernel_name, tuner)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="small shapes, for a CPU run in the interpreter")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.small:
        print("bench/attention_grads.py needs CUDA at its real sizes (no GPU here); --small runs the same flow in "
              "the interpreter (TRITON_INTERPRET=1)")
        return
    bf16, f16 = torch.bfloat16, torch.float16
    if args.small:
        first = (2, 4, 2, 80, 32, None, bf16, "bhtd", device)
        cases = [first, (1, 4, 2, 48, 32, None, bf16, "bthd", device), (2, 4, 1, 37, 16, None, f16, "bhtd", device)]
    else:
        first = (2, 16, 8, 8192, 128, None, bf16, "bhtd", device)  # bench/attention.py's shape, which failed
        cases = [first, (2, 16, 8, 8192, 128, None, bf16, "bthd", device),
                 (1, 16, 8, 2048, 128, None, bf16, "bhtd", device),  # test_gradients_real_sizes_cuda's, which held
                 (2, 8, 1, 1999, 64, None, f16, "bthd", device)]  # the atomic dQ path (D <= 64)
    case("default", *first)
    print("    configs:", chosen())
    case("deterministic", *first, deterministic=True)
    for c in cases[1:]:
        case("default", *c)
        print("    configs:", chosen())
    A.TMA_LOADS = False
    case("plain loads", *first)
    print("    configs:", chosen())
    A.TMA_LOADS = True
    kv_split = A._kv_split  # one query head per dK/dV program: no Q / dO descriptor is rebuilt inside its loop
    A._kv_split = lambda B, Hkv, Tk, q_per_kv, device: q_per_kv
    case("one query head per dK/dV program", *first, second=False)
    A._kv_split = kv_split
    pinned("_bwd_dq_kernel", A._DQ_SHAPES, first)
    pinned("_bwd_dkdv_kernel", A._DKDV_SHAPES, first)


if __name__ == "__main__":
    main()
