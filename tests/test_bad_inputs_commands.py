"""Bad input to the commands and tools not covered elsewhere: one line naming the file, non-zero exit, no traceback."""
import pytest
from conftest import SHARED, TINY, assert_one_clear_line, run_script


def assert_one_line(result, *needles):
    """assert_one_clear_line, and nothing else on stderr."""
    assert_one_clear_line(result, *needles)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("layout", ["missing", "empty", "damaged step"])
def test_consolidate_without_a_readable_sharded_checkpoint_is_one_line(tmp_path, layout):
    out = tmp_path / "run"
    if layout != "missing":
        out.mkdir()
    if layout == "damaged step":
        (out / "step_1").mkdir()
        (out / "step_1" / "meta.pt").write_bytes(b"x")
        (out / "step_1" / ".metadata").write_bytes(b"junk")
    assert_one_line(run_script("tools/consolidate.py", str(out), check=False), "consolidate", str(out))
    assert not (out / "ckpt.pt").exists()


def test_consolidate_writes_the_newest_step_as_one_checkpoint(tmp_path, seed):
    """The good path beside the refusals: a step_N/ folder (DCP shards + meta.pt) becomes ckpt.pt, tensors equal."""
    from dataclasses import asdict

    import torch
    import torch.distributed.checkpoint as dcp

    from model import GPT, GPTConfig
    from nanogpt.checkpoint import read_checkpoint_file, save_checkpoint
    model = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=16, vocab_size=37))
    for step in ("step_000002", "step_000004"):  # the newest one counts
        with torch.no_grad():
            model.wte.weight.add_(1.0)
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp_path / step))
        save_checkpoint({"model_args": asdict(model.config), "iter_num": int(step[5:]),
                         "tokenizer": {"kind": "char", "chars": "".join(map(chr, range(65, 102)))}},
                        str(tmp_path / step / "meta.pt"))
    result = run_script("tools/consolidate.py", str(tmp_path))
    assert "step_000004" in result.stdout
    ckpt = read_checkpoint_file(str(tmp_path / "ckpt.pt"))
    assert ckpt["iter_num"] == 4
    assert all(torch.equal(ckpt["model"][k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------------- train.py


def train(data_root, out, *args, check=False):
    return run_script("train.py", *TINY, f"--data_root={data_root}", f"--out_dir={out}", *args, check=check)


def test_an_empty_out_dir_setting_is_refused():
    assert_one_line(run_script("train.py", "--out_dir=", check=False), "out_dir must name a folder")


@pytest.mark.parametrize("args, needle", [
    (["--dpo_beta=0.2"], "dpo_beta only apply to preference pairs"),
    (["--dpo_ipo=True", "--dpo_beta=0.5"], "dpo_beta, dpo_ipo only apply"),
    (["--dataset=nosuch"], "nosuch"),
])
def test_a_refused_run_leaves_no_folder_and_dpo_settings_need_pairs(data_root, tmp_path, args, needle):
    out = tmp_path / "never"
    assert_one_line(train(data_root, out, *args), needle)
    assert not out.exists()


def test_a_second_run_into_a_busy_out_dir_is_refused_and_a_killed_run_leaves_no_lock(data_root, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    from nanogpt import start
    out = tmp_path / "busy"
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *TINY, f"--data_root={data_root}",
                              f"--out_dir={out}", "--max_iters=100000", "--eval_interval=100000"], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = out / start.LOCK_FILE
        deadline = time.time() + 120
        while not (lock.exists() and lock.read_text().strip() == str(first.pid)) and time.time() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended early"
        second = train(data_root, out, "--overwrite=True")
        assert_one_line(second, str(out), "in use by another train.py", f"pid {first.pid}")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    start.lock_out_dir(str(out)).close()  # the killed run's lock went with its process


def test_resuming_with_another_objective_is_refused(data_root, tmp_path):
    import torch

    from nanogpt.checkpoint import read_state, save_checkpoint
    out = tmp_path / "run"
    train(data_root, out, "--max_iters=2", "--eval_interval=2", check=True)
    ckpt = read_state(str(out / "ckpt.pt"))
    assert ckpt["objective"] == "next_token"
    ckpt["objective"] = "dpo"  # as a DPO run's checkpoint records it
    save_checkpoint(ckpt, str(out / "ckpt.pt"))
    before = (out / "ckpt.pt").read_bytes()
    assert_one_line(train(data_root, out, "--init_from=resume", "--max_iters=4"), "is a dpo run",
                    "trains next_token", f"--init_from={out}")
    assert (out / "ckpt.pt").read_bytes() == before and torch.is_tensor(ckpt["rng"]["torch"])


@pytest.mark.parametrize("vocab_size", [65, 50304])
def test_a_checkpoint_without_a_tokenizer_is_refused_unless_gpt2_sized(tmp_path, vocab_size):
    """It was decoded as GPT-2 whatever its vocabulary (garbage for a character model)."""
    from dataclasses import asdict

    from model import GPT, GPTConfig
    from nanogpt.checkpoint import save_checkpoint
    cfg = GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=16, vocab_size=vocab_size)
    (tmp_path / "run").mkdir()
    save_checkpoint({"model": GPT(cfg).state_dict(), "model_args": asdict(cfg)}, str(tmp_path / "run" / "ckpt.pt"))
    result = run_script("sample.py", f"--out_dir={tmp_path / 'run'}", "--device=cpu", "--num_samples=1",
                        "--max_new_tokens=3", check=False)
    if vocab_size == 65:
        assert_one_line(result, "names no tokenizer", "65-token vocabulary is not GPT-2's")
    else:
        assert result.returncode == 0 and "GPT-2 BPE is used" in result.stderr, result.stderr


def test_resuming_with_another_model_shape_names_the_setting_in_one_line(data_root, tmp_path):
    out = tmp_path / "run"
    train(data_root, out, "--max_iters=2", "--eval_interval=2", check=True)
    assert_one_line(train(data_root, out, "--init_from=resume", "--max_iters=4", "--n_layer=3", "--n_embd=48"),
                    "'n_layer': (2, 3)", "'n_embd': (32, 48)")


@pytest.mark.parametrize("script, args", [
    ("sample.py", ["--device=cpu"]), ("eval.py", ["--tasks=arc_easy", "--device=cpu"]),
    ("eval_mmlu.py", ["--device=cpu", f"--data_dir={SHARED}/data/mmlu"]), ("tools/export_hf.py", ["--hf_dir={tmp}/hf"]),
    ("train.py", [*TINY, "--init_from=resume"]),
])
def test_a_zero_byte_checkpoint_is_one_line_everywhere(tmp_path, script, args):
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt.pt").write_bytes(b"")
    result = run_script(script, f"--out_dir={run}", *[a.format(tmp=tmp_path) for a in args], check=False)
    assert_one_clear_line(result, str(run / "ckpt.pt"), "not a readable checkpoint")
