"""runs/gsm8k_gpu.sh, the GPU pipeline (GSM8K from a GPT-2-BPE base: SFT, RL, three evaluations, a report), shrunk
onto the CPU: a random 2-layer GPT-2-BPE base, two SFT steps, one RL step, two test problems; offline, GSM8K's train
file stands in for its test file too. What it checks is the plumbing: every stage runs and the report holds them."""
import json
import os
import subprocess
from pathlib import Path

import torch

from tests.conftest import ROOT, SHARED
from tests.test_eval_tasks import tiny_gpt2_checkpoint


def test_gsm8k_pipeline_runs_end_to_end_shrunk(tmp_path):
    torch.manual_seed(0)
    base = tiny_gpt2_checkpoint(tmp_path / "base", block_size=512)  # the RL stage's block
    train = os.path.join(SHARED, "data", "gsm8k", "train.jsonl")
    env = {**os.environ, "OUT": str(tmp_path / "out"), "BASE": base, "GPUS": "1", "GSM8K_INPUT": f"{train} {train}",
           "SFT_ARGS": "--max_iters=2 --batch_size=2 --eval_iters=1 --eval_interval=2 --warmup_iters=0",
           "RL_ARGS": "--max_iters=1 --rl_prompts=2 --rl_group_size=2 --rl_max_new_tokens=4 --rl_eval_problems=2 "
                      "--rl_eval_samples=2 --eval_interval=1 --eval_iters=1 --batch_size=4",
           "EVAL_LIMIT": "2", "EVAL_ARGS": "--max_new_tokens=4 --device=cpu"}
    run = subprocess.run(["bash", "runs/gsm8k_gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert list(report["stages"]) == ["base", "sft", "rl"]
    for stage in report["stages"].values():
        assert stage["test_problems"] == 2 and 0.0 <= stage["exact_match_strict"] <= 1.0
    assert set(report["times"]) == {"prepare", "sft", "rl", "eval_base", "eval_sft", "eval_rl"}
    assert "| rl |" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "data" / "gsm8k" / "test.jsonl").exists()  # kept for RL's problems
    assert Path(tmp_path / "out" / "rl" / "ckpt.pt").exists()


def test_gsm8k_pipeline_needs_a_base(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if k != "BASE"}, "OUT": str(tmp_path)}
    run = subprocess.run(["bash", "runs/gsm8k_gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "set BASE to a GPT-2-BPE checkpoint" in run.stderr.strip().splitlines()[-1]


def test_the_pipelines_answer_help():
    for script in ("runs/gsm8k_gpu.sh", "runs/cpu_demo.sh"):
        run = subprocess.run(["bash", script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert run.returncode == 0 and f"bash {script}" in run.stdout and "set -euo" not in run.stdout, script
