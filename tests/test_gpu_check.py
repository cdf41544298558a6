"""bench/gpu_check.sh, the 10-minute GPU check, in its --dry-run on the CPU: every step runs under `timeout` with its
output kept, a failing or hanging step does not stop the next one, the limits fit 10 minutes, and one markdown file
comes out. The dry run also runs each real benchmark command far enough to check its options (they exit without a
GPU) and collects each pytest selection (an empty one fails)."""
import os
import re
import subprocess

from conftest import ROOT

STEPS = ["env", "attention-grads", "tests", "attention", "fp8-gemm", "window", "train", "decode", "fp8-quantize-mlp",
         "quant-gemm"]


def dry_run(out, **env):
    return subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=900)


def summary(markdown):
    """{step: (status, limit)} from the summary table."""
    rows = re.findall(r"^\| ([\w-]+) \| ([^|]+) \| (\d+) \| (\d+) \|$", markdown, re.M)
    return {name: (status, int(limit)) for name, status, _, limit in rows}


def test_dry_run_passes_and_writes_one_markdown(tmp_path):
    run = dry_run(tmp_path / "check.md")
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["check.md", "check.md.log"]
    markdown = (tmp_path / "check.md").read_text()
    steps = summary(markdown)
    assert list(steps) == STEPS, steps
    assert all(status == "ok" for status, _ in steps.values()), steps
    assert sum(limit for _, limit in steps.values()) <= 590  # 10 minutes, one device call
    for name in STEPS:  # each step's section with its command and output
        assert f"\n### {name}: ok\n" in markdown
    assert "tests collected" in markdown and "needs CUDA" in markdown  # the commands really ran


def test_a_failing_or_hanging_step_does_not_stop_the_rest(tmp_path):
    run = dry_run(tmp_path / "check.md", GPU_CHECK_STUB="1", GPU_CHECK_FAIL="attention,train",
                  GPU_CHECK_HANG="fp8-gemm")
    assert run.returncode == 1, run.stdout + run.stderr
    steps = summary((tmp_path / "check.md").read_text())
    assert list(steps) == STEPS
    assert steps["attention"][0] == steps["train"][0] == "failed (exit 1)"
    assert steps["fp8-gemm"][0] == "timed out after 2 s"
    assert all(status == "ok" for name, (status, _) in steps.items() if name not in ("attention", "train", "fp8-gemm"))
    log = (tmp_path / "check.md.log").read_text()
    assert "===== decode: ok" in log and "simulated failure" in log
