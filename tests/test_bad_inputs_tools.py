"""Bad inputs to the evaluation commands, the tools and the prepare scripts: each stops with one clear line (no
traceback) before anything is touched, or gives the correct result. Each case runs the real script in a subprocess."""
import json
import os
import string
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from model import GPT, GPTConfig
from nanogpt.checkpoint import save_checkpoint
from nanogpt.shards import write_shard
from nanogpt.tokenizer import save_dataset_spec
from tests.conftest import ROOT, SHARED, TINY, assert_one_clear_line, run_script

OFFLINE = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": None,
           "no_proxy": None}  # a download that was not refused first fails at once
CHARS = string.printable
SHAKESPEARE = os.path.join(SHARED, "data", "tinyshakespeare", "input.txt")
BAD_UTF8 = b'\n{"b": "\xff"}\n'  # invalid UTF-8 on line 2


def run_in(folder, script, *args):
    """Run a repo script with `folder` as the current directory."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=folder,
                          capture_output=True, text=True, timeout=300)


def char_checkpoint(folder):
    """A tiny character-level SwiGLU checkpoint (exportable to Qwen3) in folder/ckpt.pt."""
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=32, vocab_size=len(CHARS), n_layer=1, n_embd=32, n_head=2, mlp="swiglu")
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint({"model": GPT(cfg).state_dict(), "model_args": asdict(cfg), "iter_num": 3,
                     "tokenizer": {"kind": "char", "chars": CHARS}}, str(folder / "ckpt.pt"))
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return char_checkpoint(tmp_path_factory.mktemp("bad_tools") / "run")

# ----------------------------------------------------------------------------------------------------- export


def test_export_into_the_current_folder_is_refused_and_deletes_nothing(run_dir):
    result = run_in(run_dir, "tools/export_hf.py", "--out_dir=.", "--hf_dir=.", "--overwrite=True")
    assert_one_clear_line(result, "--hf_dir=.", "current folder")
    assert (run_dir / "ckpt.pt").exists()


def test_export_into_the_run_it_exports_is_refused(run_dir):
    result = run_script("tools/export_hf.py", f"--out_dir={run_dir}", f"--hf_dir={run_dir}", "--overwrite=True",
                        check=False)
    assert_one_clear_line(result, f"--hf_dir={run_dir}", "holds the run being exported")
    assert (run_dir / "ckpt.pt").exists()


def test_export_into_a_folder_of_other_files_is_refused(run_dir, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    result = run_script("tools/export_hf.py", f"--out_dir={run_dir}", f"--hf_dir={tmp_path / 'hf'}",
                        "--overwrite=True", check=False)
    assert_one_clear_line(result, f"--hf_dir={tmp_path / 'hf'}", "notes.txt")
    assert (tmp_path / "hf" / "notes.txt").read_text() == "mine"


def test_export_onto_a_file_is_refused_and_leaves_nothing_behind(run_dir, tmp_path):
    (tmp_path / "model").write_text("a file")
    result = run_script("tools/export_hf.py", f"--out_dir={run_dir}", f"--hf_dir={tmp_path / 'model'}",
                        "--overwrite=True", check=False)
    assert_one_clear_line(result, f"--hf_dir={tmp_path / 'model'}", "is a file")
    assert os.listdir(tmp_path) == ["model"] and (tmp_path / "model").read_text() == "a file"

# ---------------------------------------------------------------------------------------------- prepare scripts


def conversations_file(folder, n=4):
    path = folder / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                                     {"role": "assistant", "content": "hello"}]}) + "\n"
                            for i in range(n)))
    return str(path)


@pytest.mark.parametrize("name", ["shakespeare_char", "shakespeare", "tinystories", "fineweb10B", "gsm8k", "hh_rlhf",
                                  "chat"])
def test_a_prepare_script_never_replaces_a_dataset_unasked(name, tmp_path):
    out = tmp_path / "dataset"
    out.mkdir()
    write_shard(out / "train_000000.bin", [1, 2, 3], 65)
    before = (out / "train_000000.bin").read_bytes()
    extra = ["--input", conversations_file(tmp_path)] if name == "chat" else []
    result = run_script(f"data/{name}/prepare.py", "--out_dir", out, *extra, env=OFFLINE, check=False)
    assert_one_clear_line(result, str(out), "--overwrite")
    assert sorted(os.listdir(out)) == ["train_000000.bin"] and (out / "train_000000.bin").read_bytes() == before


def test_overwrite_replaces_the_whole_dataset(tmp_path):
    out = tmp_path / "dataset"
    run_script("data/chat/prepare.py", "--input", conversations_file(tmp_path), "--out_dir", out, "--block_size", "32")
    assert (out / "rows.json").exists() and (out / "mask_train_000000.bin").exists()
    run_script("data/shakespeare_char/prepare.py", "--input", SHAKESPEARE, "--out_dir", out, "--overwrite")
    assert sorted(os.listdir(out)) == ["input.txt", "tokenizer.json", "train_000000.bin", "val_000000.bin"]


@pytest.mark.parametrize("name, message", [("gsm8k", "holds no problems"), ("hh_rlhf", "no usable pairs"),
                                           ("chat", "no records")])
def test_an_empty_input_is_an_error(name, message, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    result = run_script(f"data/{name}/prepare.py", "--input", tmp_path / "empty.jsonl", "--out_dir", tmp_path / "out",
                        check=False)
    assert_one_clear_line(result, str(tmp_path / "empty.jsonl"), message)
    assert not os.path.exists(tmp_path / "out" / "train_000000.bin")


@pytest.mark.parametrize("name", ["chat", "gsm8k", "hh_rlhf", "shakespeare_char"])
def test_invalid_utf8_in_a_prepare_input_names_file_and_line(name, tmp_path):
    (tmp_path / "bad.txt").write_bytes(BAD_UTF8)
    result = run_script(f"data/{name}/prepare.py", "--input", tmp_path / "bad.txt", "--out_dir", tmp_path / "out",
                        check=False)
    assert_one_clear_line(result, f"{tmp_path / 'bad.txt'}:2", "UTF-8")


def test_invalid_utf8_in_a_tinystories_input_names_file_and_line(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"a story\n<|endoftext|>\nanother \xff one\n")
    result = run_script("data/tinystories/prepare.py", "--input", tmp_path / "bad.txt", "--out_dir", tmp_path / "out",
                        "--workers", "1", check=False)
    assert_one_clear_line(result, f"{tmp_path / 'bad.txt'}:3", "UTF-8")

# ---------------------------------------------------------------------------------------------------- datasets


def dataset(folder, rows=None, spec=None):
    """A dataset folder of char shards; rows.json and tokenizer.json written as the raw text given."""
    folder.mkdir(parents=True)
    for split in ("train", "val"):
        write_shard(folder / f"{split}_000000.bin", torch.randint(0, 65, (4000,)).numpy(), 65)
    save_dataset_spec(folder, {"kind": "char", "chars": "".join(chr(32 + i) for i in range(65))})
    if spec is not None:
        (folder / "tokenizer.json").write_text(spec)
    if rows is not None:
        (folder / "rows.json").write_text(rows)
    return folder


@pytest.mark.parametrize("rows, spec, needles", [
    ("[1]", None, ["rows.json", "expected an object"]),
    ("{\"kind\": ", None, ["rows.json:1", "not valid JSON"]),
    (None, "{\"kind\": \"char\",\n", ["tokenizer.json:2", "not valid JSON"]),
    (None, "[\"gpt2\"]", ["tokenizer.json", "expected a tokenizer spec"]),
])
def test_damaged_dataset_records_name_the_file(rows, spec, needles, tmp_path):
    dataset(tmp_path / "data" / "bad", rows, spec)
    result = run_script("train.py", *TINY, f"--data_root={tmp_path / 'data'}", "--dataset=bad", "--max_iters=1",
                        f"--out_dir={tmp_path / 'out'}", check=False)
    assert_one_clear_line(result, *needles)

# ------------------------------------------------------------------------------------------------- evaluation


def test_eval_refuses_an_unwritable_results_folder_before_scoring(tmp_path):
    run = char_checkpoint(tmp_path / "run")
    (run / "eval.json").mkdir()
    (run / "mmlu.json").mkdir()
    result = run_script("eval.py", f"--out_dir={run}", "--tasks=bpb", f"--text_file={SHAKESPEARE}", "--device=cpu",
                        check=False)
    assert_one_clear_line(result, f"--out_dir={run}", "eval.json")
    assert "running" not in result.stdout
    result = run_script("eval_mmlu.py", f"--out_dir={run}", "--data_dir=/nonexistent", "--device=cpu", check=False)
    assert_one_clear_line(result, f"--out_dir={run}", "mmlu.json")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_eval_refuses_a_read_only_results_folder(tmp_path):
    run = char_checkpoint(tmp_path / "run")
    run.chmod(0o555)
    try:
        result = run_script("eval.py", f"--out_dir={run}", "--tasks=bpb", f"--text_file={SHAKESPEARE}",
                            "--device=cpu", check=False)
    finally:
        run.chmod(0o755)
    assert_one_clear_line(result, f"--out_dir={run}", "cannot write")


@pytest.mark.parametrize("files, task, needles", [
    ({"empty.txt": b""}, ["--tasks=bpb", "--text_file={d}/empty.txt"], ["bpb:", "empty.txt", "no text"]),
    ({"hellaswag_val.jsonl": b""}, ["--tasks=hellaswag", "--num_fewshot=0"], ["hellaswag_val.jsonl", "no rows"]),
    ({"mc_task.json": b"[]"}, ["--tasks=truthfulqa_mc1"], ["mc_task.json", "no rows"]),
    ({"hellaswag_val.jsonl": BAD_UTF8}, ["--tasks=hellaswag", "--num_fewshot=0"], ["hellaswag_val.jsonl:2", "UTF-8"]),
    ({"mc_task.json": b'[\n{"question": "q",\n'}, ["--tasks=truthfulqa_mc2"], ["mc_task.json:3", "not valid JSON"]),
    ({"mc_task.json": b'[\n"\xff"]'}, ["--tasks=truthfulqa_mc2"], ["mc_task.json:2", "UTF-8"]),
    ({"rows/rows.json": b"[1]", "rows/val_000000.bin": b""}, ["--tasks=bpb", "--text_file={d}/rows"],
     ["rows.json", "expected an object"]),
])
def test_empty_or_damaged_task_files_stop_with_one_line(files, task, needles, run_dir, tmp_path):
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    args = [a.format(d=tmp_path) for a in task]
    result = run_script("eval.py", f"--out_dir={run_dir}", f"--data_dir={tmp_path}", *args, "--device=cpu",
                        check=False)
    assert_one_clear_line(result, *needles)


@pytest.mark.parametrize("content, needles", [
    (b"q,a,b,c,d,A\nq2,\xff,b,c,d,B\n", ["dev/marketing_dev.csv:2", "UTF-8"]),  # invalid UTF-8: file and line
    (b"", ["no questions", "marketing"]),                                       # empty CSVs
])
def test_bad_mmlu_csvs_stop_with_one_line(run_dir, tmp_path, content, needles):
    for split in ("dev", "test"):
        (tmp_path / split).mkdir()
        (tmp_path / split / f"marketing_{split}.csv").write_bytes(content)
    result = run_script("eval_mmlu.py", f"--out_dir={run_dir}", f"--data_dir={tmp_path}", "--device=cpu",
                        check=False)
    assert_one_clear_line(result, *needles)


@pytest.fixture(scope="module")
def hf_folder(run_dir, tmp_path_factory):
    pytest.importorskip("safetensors")
    pytest.importorskip("tokenizers")
    folder = tmp_path_factory.mktemp("hf") / "model"
    run_script("tools/export_hf.py", f"--out_dir={run_dir}", f"--hf_dir={folder}")
    return folder


@pytest.mark.parametrize("name, keep, needles", [
    ("config.json", 40, ["config.json:", "not valid JSON"]),
    ("config.json", None, ["config.json lacks", "num_hidden_layers"]),
    ("model.safetensors", 100, ["model.safetensors", "not a readable safetensors file"]),
    ("tokenizer.json", 30, ["tokenizer.json:", "not valid JSON"]),
])
def test_a_damaged_hugging_face_folder_names_the_file(name, keep, needles, hf_folder, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for f in os.listdir(hf_folder):
        (folder / f).write_bytes((hf_folder / f).read_bytes())
    if keep is None:  # a config.json cut at a line end: valid JSON without most of its fields
        (folder / name).write_text(json.dumps({"model_type": "qwen3", "vocab_size": len(CHARS)}))
    else:
        (folder / name).write_bytes((folder / name).read_bytes()[:keep])
    result = run_script("eval.py", f"--out_dir=hf:{folder}", "--tasks=bpb", f"--text_file={SHAKESPEARE}",
                        "--device=cpu", check=False)
    assert_one_clear_line(result, *needles)

# ----------------------------------------------------------------------------------------------------- tools


def test_the_lm_eval_adapter_without_lm_eval_says_what_to_install():
    code = ("import runpy, sys\n"
            "sys.modules['lm_eval'] = None  # as if it were not installed\n"
            "sys.argv = ['tools/lm_eval_adapter.py', '--help']\n"
            "runpy.run_path('tools/lm_eval_adapter.py', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert_one_clear_line(result, "pip install lm-eval")


def metrics_run(folder, text=None):
    folder.mkdir()
    if text is not None:
        (folder / "metrics.jsonl").write_text(text)
    return folder


@pytest.mark.parametrize("text, needles", [
    (None, ["has no metrics"]),
    ("", ["has no metrics"]),
    ('{"iter": 0, "val_loss": 2.0, "time": 1.0}\nnot json\n{"iter": 4, "val_loss": 1.5, "time": 2.0}\n',
     ["metrics.jsonl:2", "not valid JSON"]),
    ('[1, 2]\n', ["metrics.jsonl: row 1 has no integer iter"]),
])
def test_compare_on_a_run_without_a_readable_metrics_log(text, needles, tmp_path):
    run = metrics_run(tmp_path / "run", text)
    result = run_script("tools/compare.py", run, f"--png={tmp_path / 'c.png'}", check=False)
    assert_one_clear_line(result, str(run), *needles)


def test_compare_on_a_missing_run(tmp_path):
    result = run_script("tools/compare.py", tmp_path / "nosuch", f"--png={tmp_path / 'c.png'}", check=False)
    assert_one_clear_line(result, str(tmp_path / "nosuch"), "is not a folder")


def test_compare_drops_a_cut_last_line_with_a_warning(tmp_path):
    run = metrics_run(tmp_path / "run", '{"iter": 0, "val_loss": 2.0, "time": 1.0}\n'
                                        '{"iter": 4, "val_loss": 1.5, "time": 2.0}\n{"iter": 8, "val_l')
    result = run_script("tools/compare.py", run, f"--png={tmp_path / 'c.png'}")
    assert f"warning: {run / 'metrics.jsonl'}:3: dropped a cut last line" in result.stdout
    assert f"| {run} | 1.5000 | 1.5000 | 4 |" in result.stdout
