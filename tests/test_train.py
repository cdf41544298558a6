"""train.py and sample.py end to end, in subprocesses: exact resume, the quick run's CLI, failure messages."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from nanogpt.checkpoint import read_checkpoint_file, save_checkpoint
from tests.conftest import ROOT, SHARED, TINY, assert_one_clear_line, run_script


def train_losses(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["iter"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize("extra", [[], ["--n_expert=4", "--n_dense_layers=0", "--attn_pattern=LG", "--local_window=8",
                                        "--kv_share=2", "--n_kv_head=1", "--dropout=0.1"],
                                   ["--optimizer=muon", "--muon_normalize=True", "--muon_momentum_warmup=10",
                                    "--n_expert=4", "--value_embeds=1", "--lr_schedule=wsd", "--wsd_shape=1-sqrt"],
                                   ["--mtp_depth=2", "--mtp_weight_switch=10", "--memory_layers=1,", "--memory_keys=8",
                                    "--memory_topk=4", "--optimizer=muon"]])
def test_resume_reproduces_uninterrupted_losses(tmp_path, data_root, extra):
    common = TINY + extra + [f"--data_root={data_root}", "--eval_interval=8"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run_script("train.py", *common, "--max_iters=16", f"--out_dir={straight}")
    run_script("train.py", *common, "--max_iters=8", f"--out_dir={split}")
    run_script("train.py", *common, "--max_iters=16", f"--out_dir={split}", "--init_from=resume")
    a, b = train_losses(straight), train_losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 17))
    assert a == b  # bit-identical losses after the resume at iter 8


def test_quick_run_trains_and_samples(tmp_path, data_root):
    out = str(tmp_path / "out")
    result = run_script("train.py", *TINY, f"--data_root={data_root}", "--max_iters=30", "--eval_interval=15",
                 "--log_interval=10", f"--out_dir={out}")
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("final val loss")
    assert any(line.startswith("iter 10: loss") and "tok/s" in line and "mfu" in line for line in lines)
    assert {"ckpt.pt", "metrics.jsonl", "loss.png"} <= set(os.listdir(out))
    first = next(json.loads(x) for x in open(os.path.join(out, "metrics.jsonl")) if "val_loss" in x)
    assert first["val_loss"] > float(lines[-1].split()[3])  # val loss fell from its value at iter 0
    sample = run_script("sample.py", f"--out_dir={out}", "--start=ROMEO:", "--num_samples=2", "--max_new_tokens=40",
                 "--device=cpu")
    assert sample.stdout.count("ROMEO:") == 2 and "bytes/token" in sample.stdout


def test_sample_without_checkpoint_says_how_to_make_one(tmp_path):
    result = run_script("sample.py", f"--out_dir={tmp_path}", check=False)
    assert result.returncode != 0 and "python train.py" in result.stderr
    result = run_script("sample.py", f"--out_dir={tmp_path / 'never'}", check=False)  # a run folder not made yet
    assert result.returncode != 0 and f"python train.py --out_dir={tmp_path / 'never'}`" in result.stderr


def test_unknown_key_and_missing_dataset_fail_clearly(tmp_path):
    result = run_script("train.py", "--learning_rat=1", check=False)
    assert result.returncode == 2 and "did you mean learning_rate" in result.stderr
    result = run_script("train.py", *TINY, f"--data_root={tmp_path}", "--dataset=nothing", f"--out_dir={tmp_path}",
                        check=False)
    assert result.returncode != 0 and "python data/nothing/prepare.py" in result.stderr


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, data_root):
    out = str(tmp_path / "out")
    common = TINY + [f"--data_root={data_root}", f"--out_dir={out}", "--eval_interval=4"]
    run_script("train.py", *common, "--max_iters=4")
    before = read_checkpoint_file(os.path.join(out, "ckpt.pt"))["model"]
    result = run_script("train.py", *common, "--max_iters=12", "--init_from=resume", "--learning_rate=1e30",
                 "--grad_clip=0.0", "--warmup_iters=0", check=False)
    assert result.returncode != 0 and "not finite" in result.stderr
    after = read_checkpoint_file(os.path.join(out, "ckpt.pt"))
    assert after["iter_num"] == 4 and all(torch.equal(before[k], v) for k, v in after["model"].items())


def test_checkpoint_write_failure_keeps_previous(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint({"model": {}, "model_args": {"n_layer": 1}}, path)

    def broken_save(obj, f):
        open(f, "wb").write(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint({"model": {}, "model_args": {"n_layer": 2}}, path)
    monkeypatch.undo()
    assert read_checkpoint_file(path)["model_args"] == {"n_layer": 1} and os.listdir(tmp_path) == ["ckpt.pt"]


def test_checkpoint_of_another_model_is_refused(tmp_path):
    from nanogpt.checkpoint import model_from_checkpoint
    with pytest.raises(ValueError, match="another model version"):
        model_from_checkpoint({"model": {}, "model_args": {"n_layer": 2, "not_a_field": 1}})
    with pytest.raises(ValueError, match="not a checkpoint"):
        path = str(tmp_path / "x.pt")
        torch.save({"weights": 1}, path)
        read_checkpoint_file(path)


def test_checkpoint_trained_with_triton_samples_and_evaluates_on_cpu(tmp_path, data_root):
    """The attention kernel is the running process's choice: a model trained through the Triton kernel (the
    interpreter here) samples and evaluates on a CPU without it, also from a checkpoint of the older format that
    saved attn_impl in model_args."""
    out = str(tmp_path / "out")
    run_script("train.py", *TINY, "--attn_impl=triton", f"--data_root={data_root}", "--max_iters=4",
               "--eval_interval=4", f"--out_dir={out}", env={"TRITON_INTERPRET": "1"})
    ckpt_path = os.path.join(out, "ckpt.pt")
    assert "attn_impl" not in read_checkpoint_file(ckpt_path)["model_args"]
    no_interpreter = {"TRITON_INTERPRET": None}
    for legacy in (False, True):
        if legacy:  # older checkpoints kept the kernel in model_args
            ckpt = read_checkpoint_file(ckpt_path)
            ckpt["model_args"]["attn_impl"] = "triton"
            save_checkpoint(ckpt, ckpt_path)
        sample = run_script("sample.py", f"--out_dir={out}", "--start=ROMEO:", "--num_samples=1",
                            "--max_new_tokens=8", env=no_interpreter)
        assert "ROMEO:" in sample.stdout
        mmlu = run_script("eval_mmlu.py", f"--out_dir={out}", f"--data_dir={SHARED}/data/mmlu", "--split=val",
                          "--subjects=marketing", "--limit=4", env=no_interpreter)
        assert "accuracy" in mmlu.stdout


def test_speedrun_stops_at_the_first_evaluation_that_reaches_the_target(tmp_path, data_root):
    out = str(tmp_path / "out")
    result = run_script("train.py", *TINY, f"--data_root={data_root}", "--max_iters=200", "--eval_interval=3",
                        "--target_val_loss=3.3", f"--out_dir={out}")
    evals = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if "val_loss" in line]
    assert all(r["val_loss"] > 3.3 for r in evals[:-1]) and evals[-1]["val_loss"] <= 3.3 and evals[-1]["iter"] < 200
    line = next(x for x in result.stdout.splitlines() if x.startswith("reached val loss"))
    step = evals[-1]["iter"]
    assert f"<= 3.3 at step {step} after " in line and f", {step * 4 * 32:,} tokens, world 1" in line
    seconds = float(line.split(" after ")[1].split(" s ")[0])
    assert 0 < seconds < evals[-1]["time"]  # training time only: the evaluations are not in it


def test_speedrun_config_plans_and_runs_shrunk_on_the_cpu(tmp_path, seed):
    import numpy as np

    from nanogpt.shards import write_shard
    from nanogpt.tokenizer import save_dataset_spec
    plan = run_script("train.py", "config/speedrun_gpt2.py", "--dry_run=True", f"--data_root={tmp_path}")
    assert "parameters:" in plan.stdout and "total per GPU" in plan.stdout
    fineweb = tmp_path / "fineweb10B"  # FineWeb-format shards of random GPT-2 ids, 64 of them: learnable in 6 steps
    fineweb.mkdir()
    rng = np.random.default_rng(seed)
    for name in ("train_000000.bin", "val_000000.bin"):
        write_shard(str(fineweb / name), rng.integers(0, 64, 20_000), 50257)
    save_dataset_spec(str(fineweb), {"kind": "gpt2"})
    out = tmp_path / "out"
    shrunk = ["--n_layer=2", "--n_embd=64", "--n_head=1", "--mlp_hidden=128", "--block_size=64", "--batch_size=4",
              "--total_batch_size=512", "--val_tokens=1000", "--max_iters=6", "--eval_interval=3", "--compile=False",
              "--device=cpu", "--log_interval=1", "--muon_momentum_warmup=3"]
    result = run_script("train.py", "config/speedrun_gpt2.py", *shrunk, f"--data_root={tmp_path}", f"--out_dir={out}")
    assert "final val loss" in result.stdout
    evals = [json.loads(line) for line in open(out / "metrics.jsonl") if "val_loss" in line]
    assert [r["iter"] for r in evals] == [0, 3, 6] and evals[-1]["val_loss"] < evals[0]["val_loss"]


def test_importing_train_runs_nothing(tmp_path):
    """train.py runs under `if __name__ == "__main__"`: importing it reads no arguments and touches no files."""
    code = ("import sys; sys.argv = ['train.py', '--max_iters=not-a-number', '--out_dir=never']; import train; "
            "print(train.batch_size, callable(train.main))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.split() == ["32", "True"], result.stderr
    assert not os.path.exists(os.path.join(ROOT, "never"))


def test_train_only_trains_the_matching_parameters_alone(tmp_path, data_root):
    """train_only: a full-match regex over parameter names; every other weight ends bit-identical to the start (the
    output norm is 'norm.weight', the blocks' norms not: a full match). A pattern that matches nothing, one that does
    not compile, and train_only with LoRA are refused in one line."""
    common = [*TINY, f"--data_root={data_root}", "--eval_interval=2"]
    run_script("train.py", *common, "--max_iters=2", f"--out_dir={tmp_path / 'base'}")
    base = str(tmp_path / "base" / "ckpt.pt")
    pattern = r"norm\.weight|blocks\.1\.mlp\..*"
    run = run_script("train.py", *common, "--max_iters=3", f"--init_from={base}", f"--train_only={pattern}",
                     "--learning_rate=1e-2", f"--out_dir={tmp_path / 'part'}")
    assert "training only blocks.1.mlp.up_proj.weight, blocks.1.mlp.down_proj.weight, norm.weight (" in run.stdout
    before, after = (read_checkpoint_file(path)["model"] for path in (base, str(tmp_path / "part" / "ckpt.pt")))
    assert set(before) == set(after)
    for name, weights in before.items():
        assert torch.equal(weights, after[name]) != bool(re.fullmatch(pattern, name)), name
    for args, needle in ((["--train_only=nothing_matches"], "matches no parameter name"),
                         (["--train_only=norm[.weight"], "is not a regular expression"),
                         (["--train_only=norm\\.weight", "--lora_rank=2"], "set one of them")):
        result = run_script("train.py", *common, "--max_iters=1", f"--init_from={base}", *args,
                            f"--out_dir={tmp_path / 'refused'}", check=False)
        assert_one_clear_line(result, needle)
