"""Every Triton kernel compiles for an H100 (sm_90a) with Triton's real compiler, which is stricter than the
interpreter the other tests run the kernels in. No GPU needed: nanokernels/check_compile.py drives the kernels' own launch
code with an offline driver, compiles every autotune config, and checks shared memory, spills, wgmma and its width,
the hardware fp8 cast and occupancy. Minutes on a cold cache: marked slow (deselect locally with -m "not slow")."""
import os
import subprocess
import sys

import pytest
import triton
from conftest import ROOT

KERNELS = ["_fwd_kernel", "_bwd_preprocess", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_decode_kernel",
           "_decode_merge_kernel", "_amax_kernel", "_quant_tiles_kernel", "_quant_rows_kernel", "_scaled_mm_kernel",
           "_quant_mm_kernel"]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")),
                    reason="this Triton has no bundled NVIDIA tools")
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "nanokernels.check_compile", "-j", "2"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=3600)  # cold: 20-40 min on 2 cores; warm: a minute
    print(run.stdout)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    for name in KERNELS:  # each kernel really went through the compiler (the check is not vacuous)
        assert any(line.split()[:1] == [name] and line.endswith(" ok") for line in lines), f"{name} not compiled"
    assert lines[-1].endswith("; 0 failed checks"), lines[-1]
