"""Compile every Triton kernel in nanokernels/ for an H100 (sm_90a) on a machine without a GPU.

    python -m nanokernels.check_compile          # one line per compiled kernel; exit status 1 if any check fails
    python -m nanokernels.check_compile -k fp8   # only the cases whose title contains "fp8"
    python -m nanokernels.check_compile -j 2     # cases compiled in 2 processes (the report is the same, in order)

Why: the tests run the kernels in Triton's interpreter, which accepts programs the compiler rejects (and knows
nothing of registers or shared memory). This drives the kernels through their own launch code, so arguments are
specialised exactly as on a GPU (ints equal to 1, 16-divisible ints and pointers), with Triton's driver swapped for
one that reports an sm_90 device and never launches. Every autotune config that survives the kernel's own pruning
is compiled (Triton -> PTX -> ptxas -> cubin, Triton's own flags) and checked. bf16 / fp16 / fp8: every config
compiles, fits the 227 KB of shared memory an H100 thread block may use, turns its tensor-core dots into wgmma
and does not spill registers (cuobjdump's stack frame is 0): the kernels prune configs that would spill before the
autotuner sees them. In a bf16 / fp16 attention case at D = 128, a config whose wgmma are narrower than N = 64 fails
when another spill-free config of the same kernel reaches N >= 64 (narrow wgmma leave the tensor cores waiting).
The fp8 quantize kernels must use the hardware saturating cast and have a config that fits 2 thread
blocks per SM. fp32 attention (a correctness path): each kernel has at least one config that fits in shared memory
(the autotuner skips the others). The weight-only int8 / int4 GEMM (quant_gemm.py) at decode and prefill shapes:
the same shared-memory and spill checks (its 16-row decode tiles run on mma.sync, not wgmma).
Each line shows shared memory, registers, stack (spill) bytes, the wgmma N used and thread blocks per SM. It cannot
check results or speed: that needs the GPU (tests and bench/). It drives Triton internals (JITFunction.run,
Autotuner.warmup, the active driver), checked with Triton 3.6 and 3.9; a newer Triton may need it adjusted.
"""
import argparse
import contextlib
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("nanokernels/check_compile.py compiles for a real GPU: run it without TRITON_INTERPRET=1")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from nanokernels import attention, fp8, quant_gemm

TARGET = GPUTarget("cuda", 90, 32)
H100_SMEM_PER_BLOCK = 227 * 1024
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
if not os.path.exists(CUOBJDUMP):
    sys.exit(f"{CUOBJDUMP} not found: this Triton has no bundled NVIDIA tools (a ROCm or CPU-only build?)")
USES_WGMMA = {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_scaled_mm_kernel"}
WIDE_WGMMA = {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"}  # N >= 64 at D = 128 where some config has it
HARDWARE_FP8_CAST = {"_quant_tiles_kernel", "_quant_rows_kernel"}
MIN_BLOCKS_PER_SM = {"_quant_tiles_kernel": 2, "_quant_rows_kernel": 2}  # memory-bound: keep bytes in flight


def min_blocks_per_sm(name, options):
    """The occupancy one of a kernel's configs must reach. Exempt: 1 x 128 tile scaling with the transposed copy,
    whose second quantization of the same tile costs ~80 registers (Triton 3.9: 1 block of 8 or 16 warps per SM);
    two passes would read x twice."""
    if name == "_quant_tiles_kernel" and options.get("SCALING") == "tile" and options.get("WRITE_T"):
        return 1
    return MIN_BLOCKS_PER_SM.get(name, 0)


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
                             "nanokernels/check_compile.py provides; add it to _OfflineDriver")


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


def wgmma_widths(ptx):
    """The N of every wgmma shape in the PTX (m64nNk16 for bf16, k32 for fp8), smallest first."""
    return sorted({int(n) for n in re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k\d+", ptx)})


def blocks_per_sm(regs, smem, num_warps):
    """Thread blocks of this kernel an H100 SM holds at once: 64K registers (allocated per warp in units of 256),
    228 KB of shared memory (1 KB reserved per block), 64 warps, 32 blocks."""
    regs_per_warp = -(-regs * 32 // 256) * 256
    return min(65536 // (regs_per_warp * num_warps), 228 * 1024 // (smem + 1024), 64 // num_warps, 32)


def attention_case(dtype, D, Hq, Hkv, Tq, Tk, window=1024, tma=True):
    """Forward and both backward variants (dQ by atomics, and deterministic) through the launch code the model uses,
    or the decode kernels when Tq = 1; tma=False: the plain-load path (inputs TMA cannot take)."""
    q = torch.empty(1, Hq, Tq, D, dtype=dtype)
    k, v = torch.empty(1, Hkv, Tk, D, dtype=dtype), torch.empty(1, Hkv, Tk, D, dtype=dtype)
    attention.TMA_LOADS = tma
    try:
        if Tq == 1:  # as model.attend decodes: every cached key visible (a local layer's ring holds its window)
            attention._decode(q, k, v, Tk)
            return
        o, lse = attention._forward(q, k, v, window)
        for deterministic in (False, True):
            attention._backward(q, k, v, o, lse, torch.empty_like(o), window, True, True, deterministic)
    finally:
        attention.TMA_LOADS = True


def scaled_mm_case(scaling, sa, sb, M=4096, N=2048, K=1024):
    a, b = torch.empty(M, K, dtype=fp8.E4M3), torch.empty(N, K, dtype=fp8.E4M3)
    fp8.scaled_mm_triton(a, b, torch.empty(sa), torch.empty(sb), scaling)


def quant_gemm_case(bits, M, dtype=torch.bfloat16, N=4096, K=4096, group=128):
    """The weight-only int8 / int4 GEMM at a decode (M <= 16) or prefill shape of a 4096-wide layer."""
    x = torch.empty(M, K, dtype=dtype)
    if bits == 8:
        q, s, z = torch.empty(N, K, dtype=torch.int8), torch.empty(N), None
    else:
        q, s = torch.empty(N, K // 2, dtype=torch.uint8), torch.empty(N, K // group)
        z = torch.empty(N, K // group, dtype=torch.uint8)
    quant_gemm.quant_matmul_triton(x, q, s, z, bits, group)


def cases():
    """(title, launch, fp32, wide) tuples: the shapes the model trains and decodes with (Tq = 1: the decode kernels);
    wide: a bf16 / fp16 attention case at D = 128, where WIDE_WGMMA applies. Ints equal to 1 specialise apart, so
    MQA, GQA and MHA groups, split and unsplit backward grids and the decode step are separate compilations."""
    x = torch.empty(4096, 1024, dtype=torch.bfloat16)
    M, N, KB = 4096, 2048, 1024 // 128
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    attn = [  # dtype, D, Hq, Hkv, Tq, Tk, TMA loads (False: the path of inputs TMA cannot take)
        (bf16, 128, 8, 1, 4096, 4096, True), (bf16, 128, 8, 1, 4096, 4096, False), (bf16, 64, 8, 8, 4096, 4096, True),
        (fp16, 128, 8, 2, 4096, 4096, True), (bf16, 32, 4, 4, 1000, 1000, True), (bf16, 16, 4, 2, 1000, 1000, True),
        (bf16, 64, 4, 2, 1000, 1000, False), (bf16, 32, 4, 2, 1000, 1000, False), (bf16, 128, 32, 1, 1, 4097, True),
        (bf16, 128, 8, 2, 1, 4097, True), (bf16, 64, 8, 8, 1, 1000, True), (fp32, 128, 8, 2, 4096, 4096, True)]
    return [
        *[(f"attention {dt} D={D} Hq={hq} Hkv={hkv} Tq={tq} Tk={tk}{'' if tma else ' plain loads'}",
           lambda a=(dt, D, hq, hkv, tq, tk, 1024, tma): attention_case(*a), dt == fp32, dt != fp32 and D == 128)
          for dt, D, hq, hkv, tq, tk, tma in attn],
        *[(f"fp8 quantize {sc} {dt} with_t", lambda a=(sc, dt): fp8.quantize_triton(x, *a, with_t=True), False, False)
          for sc in ("tensor", "row", "tile", "block") for dt in (fp8.E4M3, fp8.E5M2)],
        *[(f"fp8 scaled_mm {sc} sa={sa} sb={sb}", lambda a=(sc, sa, sb): scaled_mm_case(*a), False, False)
          for sc, sa, sb in [("tensor", (1, 1), (1, 1)), ("row", (M, 1), (N, 1)),
                             ("block", (M, KB), (N // 128, KB)), ("block", (M, KB), (N, KB))]],
        *[(f"quant_gemm int{bits} {dt} M={m}", lambda a=(bits, m, dt): quant_gemm_case(*a), dt == fp32, False)
          for bits, m, dt in [(8, 1, bf16), (8, 16, bf16), (8, 4096, bf16), (4, 1, bf16), (4, 16, bf16),
                              (4, 4096, bf16), (4, 1, fp16), (8, 1, fp32), (4, 16, fp32)]],
    ]


def measure(kernel_name, options, kernel):
    """What the report shows of one compiled config."""
    regs, stack = resource_usage(kernel)
    smem, ptx = kernel.metadata.shared, kernel.asm["ptx"]
    return dict(name=kernel_name, options=options, regs=regs, stack=stack, smem=smem, wgmma=wgmma_widths(ptx),
                blocks=blocks_per_sm(regs, smem, options.get("num_warps", 4)), hw_cast="satfinite.e" in ptx)


def problems_of(m, fp32, widest):
    """The failed checks of one measured config; widest: the largest smallest-wgmma-N among its kernel's spill-free
    configs in this case (0 when the wide-N rule does not apply)."""
    if fp32:
        return []
    name, n = m["name"], m["wgmma"]
    checks = [(f"shared memory {m['smem'] / 1024:.0f} KB > 227 KB", m["smem"] > H100_SMEM_PER_BLOCK),
              ("no wgmma", name in USES_WGMMA and not n),
              (f"spills {m['stack']} B", m["stack"] > 0),
              (f"wgmma N={n[0] if n else 0} < 64 where a config reaches N={widest}", n and n[0] < 64 <= widest),
              ("no hardware fp8 cast", name in HARDWARE_FP8_CAST and not m["hw_cast"])]
    return [text for text, bad in checks if bad]


def report_line(m, problems):
    fits = m["smem"] <= H100_SMEM_PER_BLOCK
    note = "; ".join(problems) or ("over 227 KB: skipped by the autotuner" if not fits
                                   else "spills" if m["stack"] else "ok")
    shown = " ".join(f"{k}={v}" for k, v in m["options"].items() if k != "HEAD_DIM")
    wgmma = "N=" + ",".join(map(str, m["wgmma"])) if m["wgmma"] else "-"
    return (f"  {m['name']:20s} {shown:62s} smem {m['smem'] / 1024:4.0f} KB  regs {m['regs']:3d}  "
            f"stack {m['stack']:4d}  wgmma {wgmma:11s} blocks/SM {m['blocks']:2d}  {note}")


def check_case(results, fp32, wide):
    """Print and count the failed checks of one case's compiled configs (results: kernel hash -> measurement), and
    those of its kernels: each needs a usable config, and one that reaches its blocks per SM."""
    failures, usable, occupied = 0, {}, {}
    for m in results.values():
        wanted = min_blocks_per_sm(m["name"], m["options"])
        occupied[m["name"]] = (wanted, occupied.get(m["name"], (0, False))[1] or m["blocks"] >= wanted)
        widths = [r["wgmma"][0] for r in results.values() if r["name"] == m["name"] and r["wgmma"] and not r["stack"]
                  and r["smem"] <= H100_SMEM_PER_BLOCK]  # the alternatives: configs that pass the other checks
        widest = max(widths) if wide and m["name"] in WIDE_WGMMA and widths else 0
        fits = m["smem"] <= H100_SMEM_PER_BLOCK
        usable[m["name"]] = usable.get(m["name"], False) or (fits and (fp32 or not m["stack"]))
        if m.get("shown"):  # reported (and counted) with an earlier case
            continue
        problems = problems_of(m, fp32, widest)
        failures += bool(problems)
        print(report_line(m, problems), flush=True)
    for name in [k for k, ok in usable.items() if not ok]:
        failures += 1
        print(f"  {name}: no usable config ({'none fits in shared memory' if fp32 else 'every one spills'})")
    for name, (wanted, ok) in occupied.items():
        if not ok:
            failures += 1
            print(f"  {name}: no config reaches {wanted} blocks per SM")
    return failures


def compile_case(index):
    """Compile case `index` of cases(): ([(kernel hash, measurement)] in launch order, the traceback of a compile
    error or None). Runs in a worker process under -j (the patched driver and Triton functions are inherited)."""
    start = len(compiled)
    try:
        cases()[index][1]()
        error = None
    except Exception:  # a compile error (or a Triton this script does not fit): reported, the rest go on
        error = traceback.format_exc()
    return [(kernel.hash, measure(name, options, kernel)) for name, options, kernel in compiled[start:]], error


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-k", default="", help="only the cases whose title contains this")
    parser.add_argument("-j", type=int, default=1, help="compile the cases in this many processes")
    args = parser.parse_args()
    triton.runtime.driver.set_active(_OfflineDriver())
    JITFunction.run = _compile_only(JITFunction.run)
    Autotuner.run = _all_configs
    chosen = [i for i, c in enumerate(cases()) if args.k in c[0]]
    failures, measured, t0 = 0, {}, time.time()
    with multiprocessing.get_context("fork").Pool(args.j) if args.j > 1 else contextlib.nullcontext() as pool:
        outcomes = pool.imap(compile_case, chosen) if pool else map(compile_case, chosen)
        for index, (kernels, error) in zip(chosen, outcomes):
            title, _, fp32, wide = cases()[index]
            print(title, flush=True)
            if error:
                failures += 1
                print("  FAILED (traceback on stderr)", flush=True)
                print(error, file=sys.stderr)
            results = {}
            for kernel_hash, m in kernels:
                if kernel_hash in results:  # this case launched it twice
                    continue
                if kernel_hash not in measured:  # else an earlier case compiled it (Triton's cache handed it back)
                    measured[kernel_hash] = m
                    results[kernel_hash] = dict(m)
                else:
                    results[kernel_hash] = dict(measured[kernel_hash], shown=True)
            failures += check_case(results, fp32, wide)
    print(f"{len(measured)} kernels compiled for sm_90a in {time.time() - t0:.0f} s; {failures} failed checks")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
