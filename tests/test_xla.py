"""The torch_xla path on XLA's CPU device. Runs in its own environment (torch 2.9 + torch_xla 2.9, made by .ci/run):
    PJRT_DEVICE=CPU ~/.cache/nanogpt-kernels/xla-venv/bin/python -m pytest -q tests/test_xla.py
and is skipped where torch_xla is not installed."""
import json
import os

import pytest

pytest.importorskip("torch_xla")
from tests.conftest import TINY, run_script  # noqa: E402

XLA_TINY = [*TINY, "--n_kv_head=1", "--batch_size=8", "--learning_rate=3e-3", "--lr_decay_iters=0",
            "--attn_pattern=LG", "--local_window=8", "--kv_share=2"]  # later values override TINY's


def run(script, *args, env=None, check=True):
    return run_script(script, *args, env=dict(PJRT_DEVICE="CPU", **(env or {})), check=check, timeout=900)


def rows(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl")) if '"loss"' in line]


@pytest.mark.parametrize("extra", [[], ["--n_expert=4", "--n_dense_layers=0"]])
def test_trains_on_xla_with_a_fixed_set_of_graphs(data_root, tmp_path, extra):
    out = str(tmp_path / "out")
    result = run("train.py", *XLA_TINY, *extra, "--device=xla", "--max_iters=20", "--eval_interval=20",
                 f"--data_root={data_root}", f"--out_dir={out}")
    log = rows(out)
    assert len(log) == 20 and log[-1]["loss"] < log[0]["loss"] - 0.5, result.stdout
    compilations = [r["xla_compilations"] for r in log]
    assert len(set(compilations[3:])) == 1, compilations  # no new graphs after the first steps
    assert "XLA compilations" in result.stdout and "bfloat16" in result.stdout
    # a checkpoint written on XLA samples on plain CPU, and samples on XLA too
    assert "ROMEO" in run("sample.py", f"--out_dir={out}", "--device=cpu", "--start=ROMEO", "--num_samples=1",
                          "--max_new_tokens=10").stdout
    assert "ROMEO" in run("sample.py", f"--out_dir={out}", "--device=xla", "--start=ROMEO", "--num_samples=1",
                          "--max_new_tokens=5").stdout


def test_cpu_checkpoint_resumes_on_xla(data_root, tmp_path):
    out = str(tmp_path / "out")
    run("train.py", *XLA_TINY, "--device=cpu", "--max_iters=4", "--eval_interval=4", f"--data_root={data_root}",
        f"--out_dir={out}")
    result = run("train.py", *XLA_TINY, "--device=xla", "--max_iters=8", "--eval_interval=4", "--init_from=resume",
                 f"--data_root={data_root}", f"--out_dir={out}")
    assert "resumed from" in result.stdout and [r["iter"] for r in rows(out)][-4:] == [5, 6, 7, 8]


def test_spmd_fsdpv2_shards_parameters_over_4_devices(data_root, tmp_path):
    result = run("train.py", *XLA_TINY, "--device=xla", "--fsdp=True", "--max_iters=6", "--eval_interval=6",
                 f"--data_root={data_root}", f"--out_dir={tmp_path}", env={"CPU_NUM_DEVICES": "4"})
    line = next(x for x in result.stdout.splitlines() if x.startswith("FSDPv2:"))
    sharded = int(line.split()[1])
    assert sharded > 0 and "devices=[4" in line, line
    log = rows(str(tmp_path))
    assert len(log) == 6 and log[-1]["loss"] < log[0]["loss"]
