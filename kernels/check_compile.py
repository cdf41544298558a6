"""Compile every Triton kernel in kernels/ for an H100 (sm_90a) on a machine without a GPU.

    python -m kernels.check_compile          # one line per compiled kernel; exit status 1 if any check fails

Why: the tests run the kernels in Triton's interpreter, which accepts programs the compiler rejects (and knows
nothing of registers or shared memory). This drives the kernels through their own launch code, so arguments are
specialised exactly as on a GPU (ints equal to 1, 16-divisible ints and pointers), with Triton's driver swapped for
one that reports an sm_90 device and never launches. Every autotune config that survives the kernel's own pruning
is compiled (Triton -> PTX -> ptxas -> cubin, Triton's own flags) and checked. bf16 / fp16 / fp8: every config
compiles, fits the 227 KB of shared memory an H100 thread block may use, and turns its tensor-core dots into
wgmma, and each kernel has at least one config that does not spill registers (cuobjdump's stack frame is 0;
spilling configs are listed: the autotuner may still pick one if it measures faster). fp32 attention (a correctness
path): each kernel has at least one config that fits in shared memory (the autotuner skips the others). It cannot
check results or speed: that needs the GPU (tests and bench/). It drives Triton internals (JITFunction.run,
Autotuner.warmup, the active driver), checked with Triton 3.6 and 3.9; a newer Triton may need it adjusted.
"""
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernels/check_compile.py compiles for a real GPU: run it without TRITON_INTERPRET=1")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from kernels import attention, fp8

TARGET = GPUTarget("cuda", 90, 32)
H100_SMEM_PER_BLOCK = 227 * 1024
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
if not os.path.exists(CUOBJDUMP):
    sys.exit(f"{CUOBJDUMP} not found: this Triton has no bundled NVIDIA tools (a ROCm or CPU-only build?)")
USES_DOT = {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_scaled_mm_kernel"}


class _OfflineDriver:
    """Just enough of Triton's driver interface for compiling: an sm_90 device 0 that nothing is launched on."""
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return TARGET

    def __getattr__(self, name):
        raise AttributeError(f"the offline driver has no {name}(): this Triton asks more of its driver than "
                             "kernels/check_compile.py provides; add it to _OfflineDriver")


compiled = []  # (kernel name, launch options, CompiledKernel), filled by the patched JITFunction.run


def _compile_only(run):
    def wrapper(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        options = {k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages")}
        compiled.append((self.__name__, options, kernel))
        return kernel
    return wrapper


def _all_configs(self, *args, grid, warmup, **kwargs):
    return self.warmup(*args, grid=grid, **kwargs)  # compiles each config left after pruning, launches nothing


def resource_usage(kernel):
    """(registers, stack bytes) per thread, from cuobjdump on the cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    regs, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    if not (regs and stack):
        raise RuntimeError(f"no REG: / STACK: in cuobjdump's report:\n{out}")
    return int(regs.group(1)), int(stack.group(1))


def attention_case(dtype, D, Hq, Hkv, Tq, Tk, window=1024):
    """Forward (+ backward unless decoding) through the launch code the model uses."""
    q = torch.empty(1, Hq, Tq, D, dtype=dtype)
    k, v = torch.empty(1, Hkv, Tk, D, dtype=dtype), torch.empty(1, Hkv, Tk, D, dtype=dtype)
    o, lse = attention._forward(q, k, v, window)
    if Tq > 1:
        attention._backward(q, k, v, o, lse, torch.empty_like(o), window, True, True)


def scaled_mm_case(scaling, sa, sb, M=4096, N=2048, K=1024):
    a, b = torch.empty(M, K, dtype=fp8.E4M3), torch.empty(N, K, dtype=fp8.E4M3)
    fp8.scaled_mm_triton(a, b, torch.empty(sa), torch.empty(sb), scaling)


def cases():
    """(title, launch, fp32) triples: the shapes the model trains and decodes with. Ints equal to 1 specialise apart,
    so MQA, GQA and MHA groups and the Tq = 1 decode step are separate compilations."""
    x = torch.empty(4096, 1024, dtype=torch.bfloat16)
    M, N, KB = 4096, 2048, 1024 // 128
    attn = [(torch.bfloat16, 128, 8, 1, 4096, 4096), (torch.bfloat16, 64, 8, 8, 4096, 4096),
            (torch.float16, 128, 8, 2, 4096, 4096), (torch.bfloat16, 32, 4, 4, 1000, 1000),
            (torch.bfloat16, 16, 4, 2, 1000, 1000), (torch.bfloat16, 128, 8, 1, 1, 4097),
            (torch.float32, 128, 8, 2, 4096, 4096)]
    return [
        *[(f"attention {dt} D={D} Hq={hq} Hkv={hkv} Tq={tq} Tk={tk}",
           lambda a=(dt, D, hq, hkv, tq, tk): attention_case(*a), dt == torch.float32)
          for dt, D, hq, hkv, tq, tk in attn],
        *[(f"fp8 quantize {sc} {dt} with_t", lambda a=(sc, dt): fp8.quantize_triton(x, *a, with_t=True), False)
          for sc in ("tensor", "row", "tile", "block") for dt in (fp8.E4M3, fp8.E5M2)],
        *[(f"fp8 scaled_mm {sc} sa={sa} sb={sb}", lambda a=(sc, sa, sb): scaled_mm_case(*a), False)
          for sc, sa, sb in [("tensor", (1, 1), (1, 1)), ("row", (M, 1), (N, 1)),
                             ("block", (M, KB), (N // 128, KB)), ("block", (M, KB), (N, KB))]],
    ]


def check(kernel_name, options, kernel, fp32):
    """(problems, usable, report line) for one compiled config; usable: fits, and (unless fp32) does not spill."""
    regs, stack = resource_usage(kernel)
    smem = kernel.metadata.shared
    fits, wgmma = smem <= H100_SMEM_PER_BLOCK, "wgmma" in kernel.asm["ptx"]
    problems = [] if fp32 else [p for p, bad in [(f"shared memory {smem / 1024:.0f} KB > 227 KB", not fits),
                                                 ("no wgmma", kernel_name in USES_DOT and not wgmma)] if bad]
    note = "; ".join(problems) or ("over 227 KB: skipped by the autotuner" if not fits else "spills" if stack else "ok")
    shown = " ".join(f"{k}={v}" for k, v in options.items() if k != "HEAD_DIM")
    line = (f"  {kernel_name:19s} {shown:58s} smem {smem / 1024:4.0f} KB  regs {regs:3d}  stack {stack:4d}"
            f"  {'wgmma' if wgmma else '     '}  {note}")
    return problems, fits and (fp32 or stack == 0), line


def main():
    triton.runtime.driver.set_active(_OfflineDriver())
    JITFunction.run = _compile_only(JITFunction.run)
    Autotuner.run = _all_configs
    failures, seen, t0 = 0, set(), time.time()
    for title, launch, fp32 in cases():
        print(title, flush=True)
        start = len(compiled)
        try:
            launch()
        except Exception:  # a compile error (or a Triton this script does not fit): report it, go on with the rest
            failures += 1
            print("  FAILED (traceback on stderr)", flush=True)
            traceback.print_exc()
        usable = {}
        for kernel_name, options, kernel in compiled[start:]:
            if kernel.hash in seen:  # Triton's cache handed back a kernel an earlier case compiled
                continue
            seen.add(kernel.hash)
            problems, ok, line = check(kernel_name, options, kernel, fp32)
            failures += bool(problems)
            usable[kernel_name] = usable.get(kernel_name, False) or ok
            print(line, flush=True)
        for kernel_name in [k for k, ok in usable.items() if not ok]:
            failures += 1
            print(f"  {kernel_name}: no usable config ({'none fits in shared memory' if fp32 else 'every one spills'})")
    print(f"{len(seen)} kernels compiled for sm_90a in {time.time() - t0:.0f} s; {failures} failed checks")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
