"""Phases and mixtures (nanogpt/phases.py, train.py's `phases`) and curricula (`curriculum`, prepare.py --order):
the rows each phase draws, counted from the data itself; the mixture report; a resume mid-phase; bad phase lists."""
import json
import os

import numpy as np
import pytest

from conftest import TINY, assert_one_clear_line, run_script
from nanogpt.loader import BatchLoader
from nanogpt.phases import PhaseError, PhasedLoader, Plan, check_phases
from nanogpt.shards import ShardWriter, read_shard
from nanogpt.tokenizer import save_dataset_spec

SIZES = {"a": 20_000, "b": 60_000}  # train tokens; a's ids are < 1000, b's >= 1000


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("phases")
    rng = np.random.default_rng(0)
    for i, (name, n) in enumerate(SIZES.items()):
        for split, count in (("train", n), ("val", 4000)):
            writer = ShardWriter(str(root / name), split, vocab_size=50257)
            writer.add(rng.integers(1000 * i, 1000 * (i + 1), count))
            writer.close()
        save_dataset_spec(str(root / name), {"kind": "gpt2"})
    return root


PHASES = [{"name": "warm", "datasets": {"a": 1}, "iters": 6},
          {"name": "mix", "datasets": {"a": 1, "b": 3}, "iters": 10},
          {"name": "by size", "datasets": ["a", "b"], "temperature": 1.0, "tokens": 512}]


def test_each_phase_draws_its_mixture(root):
    """Rows classified by their token ids (the data says where they came from) against the plan's weights."""
    dirs = [str(root / n) for n in SIZES]
    phases = [dict(p, iters=60) if "iters" in p else p for p in PHASES]
    plan = Plan(phases, dirs, tokens_per_iter=16 * 32 * 2)  # by size: ceil(512 / 1024) = 1 iteration
    assert plan.total_iters == 121 and plan.phase_at(59) == 0 and plan.phase_at(60) == 1 and plan.phase_at(120) == 2
    np.testing.assert_allclose(plan.weights[2], [0.25, 0.75])  # p ~ n^(1/T), T = 1: 20k vs 60k tokens
    loader = PhasedLoader(BatchLoader(dirs, "train", 16, 32, seed=3), plan, accumulation=2, block_size=32)
    from_b = np.zeros((plan.total_iters, 2))
    for step in range(2 * plan.total_iters):
        x, _ = loader.next_batch()
        b = (x[:, 0] >= 1000).sum().item()
        from_b[step // 2] += [len(x) - b, b]
    np.testing.assert_array_equal(from_b, loader.rows)  # the counts are the rows drawn
    assert from_b[:60, 1].sum() == 0  # warm: a only
    share_b = from_b[60:120, 1].sum() / from_b[60:120].sum()
    assert abs(share_b - 0.75) < 0.05, share_b  # 1920 rows: sd 0.01
    report = loader.report()
    assert report["warm"]["sources"] == {"a": {"target": 1.0, "actual": 1.0}}
    assert report["mix"]["sources"]["b"]["actual"] == round(share_b, 4)


def test_curriculum_reads_in_stored_order(root):
    loader = BatchLoader([str(root / "a")], "train", 4, 32, seed=1)
    loader.read_in_order([0])
    tokens = read_shard(str(root / "a" / "train_000000.bin"))
    for step in range(3):
        x, _ = loader.next_batch()
        for row in range(4):
            start = (step * 4 + row) * 33
            np.testing.assert_array_equal(x[row].numpy(), tokens[start:start + 32])


def losses(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["iter"]: (r["loss"], r["lr"]) for r in rows if "loss" in r}


def test_train_moves_through_phases_and_resumes_mid_phase(root, tmp_path):
    common = TINY + [f"--data_root={root}", f"--phases={PHASES}", "--eval_interval=7", "--learning_rate=1e-3",
                     "--min_lr=1e-4", "--lr_decay_iters=0"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    result = run_script("train.py", *common, f"--out_dir={straight}")
    assert "phase 2/3 'mix' (iterations 6-15) from iter 6: mixture {'a': 0.25, 'b': 0.75}" in result.stdout
    assert "phase 3/3 'by size' (iterations 16-19) from iter 16" in result.stdout  # 512 tokens / 128 per iter
    a = losses(straight)
    assert sorted(a) == list(range(1, 21))  # max_iters = the phases' 6 + 10 + 4
    assert 1e-4 < a[20][1] < 1.1e-4  # the cosine schedule ends with the plan (over 280 iters it would be ~1e-3)
    report = json.load(open(os.path.join(straight, "mixture.json")))
    assert list(report) == ["warm", "mix", "by size"] and report["warm"]["tokens"] == 6 * 4 * 32
    assert os.path.getsize(os.path.join(straight, "mixture.png")) > 0
    run_script("train.py", *common, "--max_iters=9", f"--out_dir={split}")  # stops inside 'mix' at 9
    run_script("train.py", *common, f"--out_dir={split}", "--init_from=resume")
    assert losses(split) == a  # bit-identical losses and lr after resuming mid-phase
    assert json.load(open(os.path.join(split, "mixture.json"))) == report


@pytest.mark.parametrize("phases,needle", [
    ([{"name": "p", "datasets": {"a": 1}, "iters": 5, "itres": 3}], "phases[0] 'p': unknown key 'itres'"),
    ([{"datasets": {"a": 0, "b": 0}, "iters": 5}], "sum to a positive number"),
    ([{"datasets": {"a": 1}}], "exactly one of 'iters' or 'tokens'"),
    ([{"datasets": {"a": 1}, "temperature": 2, "iters": 3}], "with a temperature, 'datasets' is a list"),
    ([{"datasets": ["a"], "temperature": 0, "iters": 3}], "temperature must be a positive number"),
])
def test_bad_phases_are_one_clear_line(phases, needle):
    with pytest.raises(PhaseError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        check_phases(phases)


def test_bad_phases_stop_train_py_with_one_line(root, tmp_path):
    bad = [{"name": "p", "datasets": {"a": -1, "b": 1}, "iters": 5}]
    result = run_script("train.py", *TINY, f"--data_root={root}", f"--phases={bad}", f"--out_dir={tmp_path}",
                        check=False)
    assert_one_clear_line(result, "phases[0] 'p'", "must be non-negative numbers that sum to a positive number")
