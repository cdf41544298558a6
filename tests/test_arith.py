"""The arith task (data/arith/prepare.py, nanogpt/tasks/arith.py) and RL's bad inputs in train.py: splits that
never overlap and replay from their seed, worked solutions the verifier accepts, and one clear line for an unknown
task or reward, a group of one, and a base checkpoint without chat tokens."""
import json
import os
from dataclasses import asdict

import pytest
import torch

from data.arith import prepare
from model import GPT, GPTConfig
from nanogpt import rl
from nanogpt.checkpoint import save_checkpoint
from nanogpt.tasks import arith
from nanogpt.tokenizer import Tokenizer, chat_spec
from tests.conftest import TINY, assert_one_clear_line, run_script


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("arith")
    prepare.main(["--out_dir", str(root / "arith"), "--text_dir", str(root / "arith_text"), "--n_train", "300",
                  "--n_val", "40", "--n_test", "60", "--block_size", "64", "--digits", "1-2"])
    return root


def questions(folder, split):
    return [json.loads(line)["question"] for line in open(os.path.join(folder, f"{split}.jsonl"))]


def test_splits_never_overlap_and_replay_from_the_seed(prepared, seed):
    folder = prepared / "arith"
    splits = {s: questions(folder, s) for s in ("train", "val", "test")}
    assert [len(v) for v in splits.values()] == [300, 40, 60]
    everything = [q for v in splits.values() for q in v]
    assert len(set(everything)) == len(everything)  # distinct inside each split and across splits
    sizes = {"test": 60, "val": 40, "train": 300}
    again = prepare.make_splits(list(prepare.FAMILIES), (1, 2), sizes, 1337)
    assert {s: [p["question"] for p in v] for s, v in again.items()} == {s: splits[s] for s in sizes}
    other = prepare.make_splits(list(prepare.FAMILIES), (1, 2), sizes, seed % 1000 + 2000)
    assert [p["question"] for p in other["test"]] != splits["test"]
    families = {json.loads(line)["family"] for line in open(folder / "train.jsonl")}
    assert families == set(prepare.FAMILIES)


def test_worked_solutions_are_right_and_verified(seed):
    import numpy as np
    rng = np.random.default_rng(seed)
    for family in prepare.FAMILIES:
        for _ in range(50):
            p = prepare.problem(rng, family, (1, 3))
            steps, final = p["answer"].split("\n####")
            for step in steps.split("\n"):  # every written step is true arithmetic
                left, right = step.split(" = ")
                assert eval(left) == int(right)  # noqa: S307 (digits and + - only)
            assert int(final) == int(steps.split(" = ")[-1]) >= 0
            assert rl.reward(p["answer"], p["answer"]) == 1.0


def test_prepared_folders(prepared):
    assert Tokenizer.for_dataset(str(prepared / "arith")).spec == chat_spec()
    assert Tokenizer.for_dataset(str(prepared / "arith_text")).spec == {"kind": "gpt2"}
    text = open(prepared / "arith" / "test.jsonl").read()
    assert rl.task_problems(str(prepared), "arith", "test")[0]["question"] in text


@pytest.mark.parametrize("args,needle", [(["--digits", "0"], "--digits"), (["--digits", "x"], "--digits"),
                                         (["--families", "add,mul"], "mul"), (["--n_test", "0"], "--n_test")])
def test_prepare_bad_arguments(tmp_path, args, needle):
    result = run_script("data/arith/prepare.py", "--out_dir", tmp_path / "a", "--text_dir", tmp_path / "t", *args,
                        check=False)
    assert_one_clear_line(result, needle)


def test_eval_prompts_follow_the_checkpoint_tokenizer():
    problems = [{"question": "Ann has 1 pens.", "answer": "#### 1"}]
    chat = Tokenizer(chat_spec())
    ids, stop = arith.prompts_and_stop(chat, problems)
    assert stop == chat.special["<|assistant_end|>"] and ids[0][-1] == chat.special["<|assistant_start|>"]
    base = Tokenizer({"kind": "gpt2"})
    ids, stop = arith.prompts_and_stop(base, problems)
    assert stop == base.eot and base.decode(ids[0]).endswith("Question: Ann has 1 pens.\nAnswer:")

# ------------------------------------------------------------------------------------------------- bad input


def base_checkpoint(path):
    cfg = GPTConfig(vocab_size=50304, n_layer=2, n_embd=32, n_head=2, block_size=64)
    model = GPT(cfg)
    model.init_weights()
    save_checkpoint({"model": model.state_dict(), "model_args": asdict(cfg), "iter_num": 1, "config": {},
                     "tokenizer": {"kind": "gpt2"}}, str(path))
    return path


@pytest.mark.parametrize("args,needles", [
    (["--rl_task=arith_v2"], ("rl_task", "arith")),
    (["--rl_task=arith", "--rl_group_size=1"], ("rl_group_size", ">= 2")),
    (["--rl_task=arith", "--rl_reward=length"], ("rl_reward",)),
    (["--rl_task=", "--rl_group_size=4"], ("rl_group_size only apply to RL",)),
    (["--rl_task=arith", "--init_from=scratch"], ("SFT",)),
    (["--rl_task=arith", "--init_from=BASE"], ("without the chat tokens", "SFT")),
])
def test_rl_bad_input_is_one_line_before_training(prepared, tmp_path, args, needles):
    args = [a.replace("BASE", str(base_checkpoint(tmp_path / "base.pt"))) if "BASE" in a else a for a in args]
    if not any(a.startswith("--init_from") for a in args):
        args.append(f"--init_from={base_checkpoint(tmp_path / 'base.pt')}")
    out = tmp_path / "out"
    result = run_script("train.py", *TINY, "--block_size=64", f"--data_root={prepared}", "--dataset=arith",
                        f"--out_dir={out}", *args, check=False)
    assert_one_clear_line(result, *needles)
    assert not out.exists()  # refused before anything was written
