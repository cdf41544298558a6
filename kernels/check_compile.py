"""Compile every Triton kernel in kernels/ for an H100 (sm_90a) on a machine without a GPU.

    python -m kernels.check_compile          # one line per compiled kernel; exit status 1 if any check fails

Why: the tests run the kernels in Triton's interpreter, which accepts programs the compiler rejects (and knows
nothing of registers or shared memory). This drives the kernels through their own launch code, so arguments are
specialised exactly as on a GPU (ints equal to 1, 16-divisible ints and pointers), with Triton's driver swapped for
one that reports an sm_90 device and never launches. Every autotune config that survives the kernel's own pruning
is compiled (Triton -> PTX -> ptxas -> cubin, Triton's own flags) and checked: it compiles, its shared memory fits
the 227 KB an H100 thread block may use, its tensor-core dots became wgmma, and the kernel has at least one config
that does not spill registers (cuobjdump's stack frame is 0; spilling configs are listed, the autotuner may still
pick one if it measures faster). It cannot check results or speed: that needs the GPU (tests and bench/).
"""
import os
import re
import subprocess
import sys
import tempfile
import time

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
USES_DOT = {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_scaled_mm_kernel"}


class _OfflineDriver:
    """Just enough of Triton's driver interface for compiling: an sm_90 device 0 that nothing is launched on."""
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return TARGET


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
    return int(re.search(r"REG:(\d+)", out).group(1)), int(re.search(r"STACK:(\d+)", out).group(1))


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
    """(title, launch) pairs: the shapes the model trains and decodes with. Ints equal to 1 specialise apart, so
    MQA, GQA and MHA groups and the Tq = 1 decode step are separate compilations."""
    x = torch.empty(4096, 1024, dtype=torch.bfloat16)
    M, N, KB = 4096, 2048, 1024 // 128
    return [
        *[(f"attention {dt} D={D} Hq={hq} Hkv={hkv} Tq={tq} Tk={tk}", lambda a=(dt, D, hq, hkv, tq, tk): attention_case(*a))
          for dt, D, hq, hkv, tq, tk in [(torch.bfloat16, 128, 8, 1, 4096, 4096), (torch.bfloat16, 64, 8, 8, 4096, 4096),
                                         (torch.float16, 128, 8, 2, 4096, 4096), (torch.bfloat16, 32, 4, 4, 1000, 1000),
                                         (torch.bfloat16, 128, 8, 1, 1, 4097)]],
        *[(f"fp8 quantize {sc} {dt} with_t", lambda a=(sc, dt): fp8.quantize_triton(x, *a, with_t=True))
          for sc in ("tensor", "row", "tile", "block") for dt in (fp8.E4M3, fp8.E5M2)],
        *[(f"fp8 scaled_mm {sc} sa={sa} sb={sb}", lambda a=(sc, sa, sb): scaled_mm_case(*a))
          for sc, sa, sb in [("tensor", (1, 1), (1, 1)), ("row", (M, 1), (N, 1)),
                             ("block", (M, KB), (N // 128, KB)), ("block", (M, KB), (N, KB))]],
    ]


def check(kernel_name, options, kernel):
    """(problems, spilled, report line) for one compiled config."""
    regs, stack = resource_usage(kernel)
    smem = kernel.metadata.shared
    wgmma = "wgmma" in kernel.asm["ptx"]
    problems = [p for p, bad in [(f"shared memory {smem / 1024:.0f} KB > 227 KB", smem > H100_SMEM_PER_BLOCK),
                                 ("no wgmma", kernel_name in USES_DOT and not wgmma)] if bad]
    shown = " ".join(f"{k}={v}" for k, v in options.items() if k != "HEAD_DIM")
    line = (f"  {kernel_name:19s} {shown:58s} smem {smem / 1024:4.0f} KB  regs {regs:3d}  stack {stack:3d}"
            f"  {'wgmma' if wgmma else '     '}  {'; '.join(problems) or ('spills' if stack else 'ok')}")
    return problems, stack > 0, line


def main():
    triton.runtime.driver.set_active(_OfflineDriver())
    JITFunction.run = _compile_only(JITFunction.run)
    Autotuner.run = _all_configs
    failures, t0 = 0, time.time()
    for title, launch in cases():
        print(title, flush=True)
        start = len(compiled)
        try:
            launch()
        except Exception as e:  # a compile error: report it, go on with the rest
            failures += 1
            print(f"  COMPILE ERROR {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
        spill_free = {}
        for kernel_name, options, kernel in compiled[start:]:
            problems, spilled, line = check(kernel_name, options, kernel)
            failures += bool(problems)
            spill_free[kernel_name] = spill_free.get(kernel_name, False) or not spilled
            print(line, flush=True)
        for kernel_name in [k for k, ok in spill_free.items() if not ok]:
            failures += 1
            print(f"  {kernel_name}: every config spills registers; add one that does not")
    print(f"{len(compiled)} kernels compiled for sm_90a in {time.time() - t0:.0f} s; {failures} failed checks")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
