"""Nothing silently wrong, nothing lost: every bad setting stops with one clear line (no traceback), trained
checkpoints are never overwritten by accident, killed writers leave nothing behind, loading never runs code, and a
new user offline gets a sentence, not a stack of tracebacks. Each case runs the real script in a subprocess."""
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from nanogpt.checkpoint import read_checkpoint_file, save_checkpoint
from nanogpt.shards import write_shard
from nanogpt.tokenizer import save_dataset_spec
from tests.conftest import SHARED, TINY, assert_one_clear_line, run_script

OFFLINE = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": None,
           "no_proxy": None}  # every download fails at once, as on a machine without a network


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """A tiny trained run (ckpt.pt at iter 8, evals at 0, 4, 8) to resume, refuse or corrupt."""
    out = str(tmp_path_factory.mktemp("trained") / "out")
    run_script("train.py", *TINY, f"--data_root={data_root}", "--max_iters=8", "--eval_interval=4", f"--out_dir={out}")
    return out


@pytest.mark.parametrize("args, needles", [
    (["--compile=no"], ["compile must be bool or None", "'no'"]),
    (["--lr_schedule=nosuch"], ["lr_schedule must be one of", "'cosine'"]),
    (["--dtype=float64"], ["dtype must be one of", "'bfloat16'"]),
    (["--device=gpu"], ["device must be", "'cuda'"]),
    (["--backend=mpi"], ["backend must be one of"]),
    (["--fp8_recipe=x"], ["fp8_recipe must be one of", "'blockwise'"]),
    (["--activation_checkpoint=some"], ["activation_checkpoint must be one of", "'selective'"]),
    (["--attn_impl=flash"], ["attn_impl must be one of", "'triton'"]),
    (["--optimizer=sgd"], ["optimizer must be one of", "'adamw'"]),
    (["--batch_size=0"], ["batch_size must be >= 1"]),
    (["--block_size=0"], ["block_size must be >= 1"]),
    (["--eval_interval=0"], ["eval_interval must be >= 1"]),
    (["--log_interval=0"], ["log_interval must be >= 1"]),
    (["--eval_iters=0"], ["eval_iters must be >= 1"]),
    (["--gradient_accumulation_steps=0"], ["gradient_accumulation_steps must be >= 1"]),
    (["--dropout=5"], ["dropout must be in [0, 1)"]),
    (["--mlp=gelu"], ["mlp must be 'swiglu' or 'relu2'"]),
    (["--n_head=3"], ["n_embd 128 must be divisible by n_head 3"]),
    (["--attn_pattern=LX"], ["attn_pattern 'LX' may only contain L"]),
    (["--init_from=resum"], ["init_from must be 'scratch', 'resume'", "'resum'"]),
    (["--out_dir=README.md"], ["out_dir 'README.md' is a file"]),
    (["--dataset=../../x"], ["dataset names are folder names", "'../../x'"]),
    (["--datasets={'a/b': 1.0}"], ["dataset names are folder names"]),
])
def test_bad_training_settings_stop_with_one_line(args, needles):
    assert_one_clear_line(run_script("train.py", *args, check=False), *needles)


def test_config_file_with_a_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("batch_size = 8\nlearning_rate = 1e-3 +\n")
    assert_one_clear_line(run_script("train.py", str(bad), check=False), f"{bad}:2:")


@pytest.mark.parametrize("args, needles", [
    (["--temperature=-1"], ["temperature must be >= 0"]), (["--top_k=-5"], ["top_k must be >= 0"]),
    (["--num_samples=0"], ["num_samples must be >= 1"]), (["--max_new_tokens=-3"], ["max_new_tokens must be >= 1"]),
    (["--top_p=0"], ["top_p must be in (0, 1]"]), (["--start=FILE:missing.txt"], ["FILE:missing.txt", "cannot read"]),
])
def test_bad_sampling_settings_stop_with_one_line(trained, args, needles):
    assert_one_clear_line(run_script("sample.py", f"--out_dir={trained}", *args, check=False), *needles)


def test_bad_mmlu_settings_and_files_stop_with_one_line(trained, tmp_path):
    mmlu = f"--data_dir={SHARED}/data/mmlu"
    assert_one_clear_line(run_script("eval_mmlu.py", f"--out_dir={trained}", mmlu, "--ntrain=-1", check=False),
                          "ntrain must be >= 0")
    assert_one_clear_line(run_script("eval_mmlu.py", f"--out_dir={trained}", mmlu, "--batch_size=0", check=False),
                          "batch_size must be >= 1")
    bad = tmp_path / "mmlu"
    for split in ("dev", "test"):
        (bad / split).mkdir(parents=True)
        (bad / split / f"virology_{split}.csv").write_text('"q?",a,b,c,d,A\n"r?",a,b,c,E\n')
    assert_one_clear_line(run_script("eval_mmlu.py", f"--out_dir={trained}", f"--data_dir={bad}", check=False),
                          "virology_dev.csv:2", "expected 6 columns")


@pytest.mark.parametrize("script", ["train.py", "sample.py", "eval_mmlu.py"])
def test_help_lists_the_settings_and_exits_zero(script):
    result = run_script(script, "--help")
    assert result.returncode == 0 and "--out_dir=" in result.stdout and "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------ tokenizers of datasets

def copy_dataset(data_root, dest, keep_record):
    shutil.copytree(os.path.join(data_root, "shakespeare_char"), dest)
    if not keep_record:
        os.remove(os.path.join(dest, "tokenizer.json"))
    return dest


def test_dataset_without_a_tokenizer_record_is_refused(data_root, tmp_path):
    copy_dataset(data_root, tmp_path / "chars", keep_record=False)
    result = run_script("train.py", *TINY, f"--data_root={tmp_path}", "--dataset=chars", f"--out_dir={tmp_path}/o",
                        check=False)
    assert_one_clear_line(result, "does not say which tokenizer", "prepare.py")


def test_mixture_of_two_tokenizers_is_refused_either_way(data_root, tmp_path, seed):
    copy_dataset(data_root, tmp_path / "chars", keep_record=True)
    bpe = tmp_path / "bpe"
    bpe.mkdir()
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        write_shard(str(bpe / f"{split}_000000.bin"), rng.integers(0, 50257, 5000), 50257)
    save_dataset_spec(str(bpe), {"kind": "gpt2"})
    for mix in ("{'chars': 0.5, 'bpe': 0.5}", "{'bpe': 0.5, 'chars': 0.5}"):
        result = run_script("train.py", *TINY, f"--data_root={tmp_path}", f"--datasets={mix}",
                            f"--out_dir={tmp_path}/o", check=False)
        assert_one_clear_line(result, "GPT-2 BPE", "character-level", "one tokenizer")


def test_old_meta_pkl_still_loads_but_a_pickle_that_runs_code_does_not(data_root, tmp_path):
    from nanogpt.tokenizer import Tokenizer
    chars = copy_dataset(data_root, tmp_path / "chars", keep_record=False)
    spec = json.load(open(os.path.join(data_root, "shakespeare_char", "tokenizer.json")))
    itos = dict(enumerate(spec["chars"]))
    with open(os.path.join(chars, "meta.pkl"), "wb") as f:  # nanoGPT's format
        pickle.dump({"vocab_size": len(itos), "itos": itos, "stoi": {c: i for i, c in itos.items()}}, f)
    assert Tokenizer.for_dataset(str(chars)).spec == spec
    marker = tmp_path / "ran"
    with open(os.path.join(chars, "meta.pkl"), "wb") as f:
        pickle.dump(Payload(str(marker)), f)
    with pytest.raises(ValueError, match="plain data"):
        Tokenizer.for_dataset(str(chars))
    assert not marker.exists()


class Payload:
    """Unpickling this calls os.system: what a crafted checkpoint or meta.pkl would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_checkpoint_runs_no_code(data_root, tmp_path):
    marker = tmp_path / "ran"
    out = tmp_path / "out"
    out.mkdir()
    torch.save({"model": {}, "model_args": {}, "payload": Payload(str(marker))}, out / "ckpt.pt")
    for script, args in (("sample.py", []), ("eval_mmlu.py", [f"--data_dir={SHARED}/data/mmlu"]),
                         ("train.py", [*TINY, f"--data_root={data_root}", "--init_from=resume"])):
        result = run_script(script, f"--out_dir={out}", *args, check=False)
        assert_one_clear_line(result, "not a readable checkpoint", "nothing in it was run")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------- nothing is lost

def test_scratch_run_never_overwrites_a_trained_checkpoint(trained, data_root):
    before = open(os.path.join(trained, "ckpt.pt"), "rb").read()
    metrics_before = open(os.path.join(trained, "metrics.jsonl")).read()
    result = run_script("train.py", *TINY, f"--data_root={data_root}", "--max_iters=4", f"--out_dir={trained}",
                        check=False)
    assert_one_clear_line(result, "already holds a trained checkpoint", "--init_from=resume", "--out_dir",
                          "--overwrite=True")
    assert open(os.path.join(trained, "ckpt.pt"), "rb").read() == before
    assert open(os.path.join(trained, "metrics.jsonl")).read() == metrics_before


def test_overwrite_setting_replaces_the_run(data_root, tmp_path):
    out = str(tmp_path / "out")
    common = [*TINY, f"--data_root={data_root}", "--eval_interval=4", f"--out_dir={out}"]
    run_script("train.py", *common, "--max_iters=8")
    run_script("train.py", *common, "--max_iters=4", "--overwrite=True")
    assert read_checkpoint_file(os.path.join(out, "ckpt.pt"))["iter_num"] == 4
    assert max(json.loads(line)["iter"] for line in open(os.path.join(out, "metrics.jsonl"))) == 4


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_files_of_killed_writers_are_removed(trained, data_root, tmp_path):
    out = shutil.copytree(trained, tmp_path / "run")
    stale_file, stale_dir = f"ckpt.pt.tmp{dead_pid()}", "step_000004.tmp"
    (out / stale_file).write_bytes(b"half a checkpoint")
    (out / stale_dir).mkdir()
    live = out / f"ckpt.pt.tmp{os.getpid()}"  # a live writer's file is left alone
    live.write_bytes(b"being written")
    result = run_script("train.py", *TINY, f"--data_root={data_root}", "--max_iters=10", "--eval_interval=4",
                        f"--out_dir={out}", "--init_from=resume")
    assert stale_file in result.stdout and stale_dir in result.stdout
    assert not (out / stale_file).exists() and not (out / stale_dir).exists() and live.exists()


def test_metrics_after_a_resume_hold_one_clean_curve(trained, data_root, tmp_path):
    out = shutil.copytree(trained, tmp_path / "run")
    common = [*TINY, f"--data_root={data_root}", "--eval_interval=4", f"--out_dir={out}", "--init_from=resume"]
    at_8 = (out / "ckpt.pt").read_bytes()
    run_script("train.py", *common, "--max_iters=12")
    (out / "ckpt.pt").write_bytes(at_8)  # as if killed after logging past its last checkpoint
    run_script("train.py", *common, "--max_iters=16")
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train_iters = [r["iter"] for r in rows if "loss" in r]
    eval_iters = [r["iter"] for r in rows if "val_loss" in r]
    assert train_iters == list(range(1, 17)) and eval_iters == [0, 4, 8, 12, 16]
    assert rows[0]["iter"] == 0 and rows[0]["lr"] > 0  # the lr panel starts at iteration 0


def test_resume_from_a_weights_only_file_says_what_to_do(trained, data_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    ckpt = read_checkpoint_file(os.path.join(trained, "ckpt.pt"))
    save_checkpoint({"model": ckpt["model"], "model_args": ckpt["model_args"], "tokenizer": ckpt["tokenizer"]},
                    str(out / "ckpt.pt"))
    result = run_script("train.py", *TINY, f"--data_root={data_root}", f"--out_dir={out}", "--init_from=resume",
                        check=False)
    assert_one_clear_line(result, "holds no training state", "optimizer", f"--init_from={out}/ckpt.pt")


def test_non_finite_loss_without_a_checkpoint_says_none_was_written(data_root, tmp_path):
    result = run_script("train.py", *TINY, f"--data_root={data_root}", f"--out_dir={tmp_path}/o", "--max_iters=8",
                        "--eval_interval=100", "--learning_rate=1e30", "--min_lr=0", "--grad_clip=0.0",
                        "--warmup_iters=0", check=False)
    assert_one_clear_line(result, "not finite", "no checkpoint was written yet")


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (needs root; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_full_disk_keeps_the_previous_checkpoint(small_disk, data_root):
    out = small_disk / "out"
    common = [*TINY, f"--data_root={data_root}", "--eval_interval=4", f"--out_dir={out}"]
    run_script("train.py", *common, "--max_iters=4")
    before = (out / "ckpt.pt").read_bytes()
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - 64 * 1024))  # leaves less than a checkpoint
    result = run_script("train.py", *common, "--max_iters=8", "--init_from=resume", check=False)
    assert_one_clear_line(result, "no space left", "the previous checkpoint is kept")
    assert (out / "ckpt.pt").read_bytes() == before and sorted(os.listdir(out)) == [".train.lock", "ckpt.pt",
                                                                                   "loss.png", "metrics.jsonl"]


# ---------------------------------------------------------------------------------------------- a new user offline

def test_first_run_offline_says_where_to_put_the_data(tmp_path):
    result = run_script("train.py", *TINY, f"--data_root={tmp_path}/data", f"--out_dir={tmp_path}/o", env=OFFLINE,
                        check=False)
    err = result.stderr.strip()
    assert result.returncode != 0 and "Traceback" not in err and len(err.splitlines()) <= 3, err
    assert "could not download" in err and f"{tmp_path}/data/shakespeare_char/input.txt" in err
    assert "resume" not in err  # no partial file exists, so there is nothing to resume


def test_mmlu_offline_suggests_data_dir(trained, tmp_path):
    result = run_script("eval_mmlu.py", f"--out_dir={trained}", f"--cache_dir={tmp_path}/cache", env=OFFLINE,
                        check=False)
    assert_one_clear_line(result, "could not download", "--data_dir")
