"""train.py's eval_tasks: eval.py's tasks on the training weights at every evaluation, logged beside the val loss
and plotted; the same values in one process, under DDP (questions split over 2 gloo ranks, records gathered) and
under FSDP2 (every rank scores every question); a bad task name is one line."""
import json
import os
from contextlib import nullcontext
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch
from conftest import SHARED, TINY, assert_one_clear_line, run_script
from test_distributed import launch

from model import GPT, GPTConfig
from nanogpt.checkpoint import save_checkpoint
from nanogpt.tasks import in_training
from nanogpt.tasks.common import Settings
from nanogpt.tokenizer import Tokenizer

MODEL = dict(n_layer=2, n_embd=32, n_head=2, block_size=256)  # room for a CrowS-Pairs sentence, one char a token
LIMIT = 10
TASKS = "crows_pairs,bbq"  # likelihood_diff: a continuous value, the same only for the same weights


@pytest.fixture(scope="module")
def setup(data_root, tmp_path_factory):
    """Prepared data, a shared initial checkpoint (identical weights in every run) and the tasks' files."""
    folder = tmp_path_factory.mktemp("in_training")
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=65, **MODEL)
    save_checkpoint({"model": GPT(cfg).state_dict(), "model_args": asdict(cfg)}, str(folder / "init.pt"))
    (folder / "tasks").mkdir()
    for name in ("crows-pairs", "bbq"):
        os.symlink(os.path.join(SHARED, "data", name), folder / "tasks" / name)
    return data_root, str(folder / "init.pt"), str(folder / "tasks")


def eval_rows(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["iter"]: r for r in rows if "val_loss" in r}


def reference(data, init, tasks):
    """The tasks on the initial weights in this process, as eval.py would score them."""
    ckpt = torch.load(init, weights_only=True)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    tok = Tokenizer.for_dataset(os.path.join(data, "shakespeare_char"))
    place = SimpleNamespace(mode="single", rank=0, world_size=1, device="cpu")
    return in_training.run_tasks(model, tok, TASKS.split(","), LIMIT, tasks, place, nullcontext())


def test_the_tasks_at_every_evaluation_match_one_process_under_ddp_and_fsdp(setup, tmp_path):
    data, init, tasks = setup
    common = [*TINY, *(f"--{k}={v}" for k, v in MODEL.items()), f"--data_root={data}", f"--init_from={init}",
              "--dtype=float32", f"--eval_tasks={TASKS}", f"--eval_task_limit={LIMIT}",
              f"--eval_task_data_dir={tasks}", "--batch_size=2"]
    expected = reference(data, init, tasks)
    assert expected["tasks_questions"] == 2 * LIMIT and 0 < expected["crows_pairs/likelihood_diff"]
    launch(2, *common, "--max_iters=2", "--eval_interval=1", f"--out_dir={tmp_path / 'ddp'}")
    launch(2, *common, "--max_iters=0", "--fsdp=True", f"--out_dir={tmp_path / 'fsdp'}")
    ddp, fsdp = eval_rows(tmp_path / "ddp"), eval_rows(tmp_path / "fsdp")
    assert sorted(ddp) == [0, 1, 2] and sorted(fsdp) == [0]
    for row in [*ddp.values(), *fsdp.values()]:  # gathered over the ranks: every question once
        assert row["val_tasks_questions"] == 2 * LIMIT and row["val_tasks_seconds"] > 0, row
        assert {"val_crows_pairs/pct_stereotype", "val_bbq/acc", "val_bbq/macro_f1"} <= set(row)
    for row in (ddp[0], fsdp[0]):  # the initial weights: the values of one process
        assert row["val_crows_pairs/likelihood_diff"] == pytest.approx(expected["crows_pairs/likelihood_diff"],
                                                                       rel=1e-5)
        assert row["val_bbq/acc"] == expected["bbq/acc"] and row["val_bbq/macro_f1"] == expected["bbq/macro_f1"]
    assert ddp[2]["val_crows_pairs/likelihood_diff"] != ddp[0]["val_crows_pairs/likelihood_diff"]  # trained
    assert os.path.getsize(tmp_path / "ddp" / "loss.png") > 0


def test_questions_are_split_over_ranks_and_gathered_back_in_order():
    rows = list(range(11))
    parts = [Settings(limit=7, rank=r, world=3).questions(rows) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert [parts[i % 3][i // 3] for i in range(sum(map(len, parts)))] == list(range(7))  # gathered()'s order
    assert Settings(limit=0).questions(rows) == rows


def test_a_bad_eval_tasks_setting_is_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"unknown tasks \['bpb', 'nosuch'\]"):
        in_training.check_names("hellaswag, bpb,nosuch")
    assert in_training.check_names("hellaswag, bbq") == ["hellaswag", "bbq"] and in_training.check_names("") == []
    result = run_script("train.py", *TINY, "--eval_tasks=hellaswag,nosuch", f"--out_dir={tmp_path / 'o'}",
                        check=False)
    assert_one_clear_line(result, "eval_tasks: unknown tasks ['nosuch']")
