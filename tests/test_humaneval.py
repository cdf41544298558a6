"""HumanEval: the canonical solutions pass 164/164 in the sandbox (run in parallel), wrong ones and a sample that
never stops fail; pass@k against a brute-force enumeration; the release's program and stop sequences by hand;
--samples scoring through eval.py (and its bad inputs, one line each); generation (greedy and sampled) on a tiny
checkpoint; the download against a local HTTP server."""
import gzip
import itertools
import json
import math
import os
from dataclasses import replace
from fractions import Fraction

import pytest
import torch
from conftest import SHARED, assert_one_clear_line
from test_data_download import server  # noqa: F401  (the local HTTP server fixture)
from test_eval_tasks import run_eval, tiny_gpt2_checkpoint, tiny_scorer  # noqa: F401  (fixtures)

from nanogpt.tasks import humaneval
from nanogpt.tasks.common import Settings
from nanogpt.tasks.humaneval import pass_at_k, program, read_problems, score

DATA = os.path.join(SHARED, "data")
SETTINGS = Settings(data_dir=DATA)


@pytest.fixture(scope="module")
def problems():
    return read_problems(SETTINGS)


def test_the_canonical_solutions_pass_all_164_and_wrong_ones_fail(problems):
    assert len(problems) == 164 and problems[0].id == "HumanEval/0" and problems[-1].id == "HumanEval/163"
    samples = {p.id: [p.canonical_solution] for p in problems}
    for p in problems[:6]:  # beside the right one: a wrong answer, and a body that never returns
        samples[p.id] += ["    return None\n", "    while True:\n        pass\n"]
    records, metrics = score(problems, samples, workers=4, limits=humaneval.Limits(timeout=3.0))
    assert metrics == ["pass@1"]
    assert [r["id"] for r in records if r["status"][0] != "passed"] == []  # 164 of 164
    for r in records[:6]:
        assert r["status"][1].startswith("failed") and r["status"][2] == "timed out after 3s", r
        assert (r["n"], r["correct"], r["pass@1"]) == (3, 1, pytest.approx(1 / 3))
    assert sum(r["pass@1"] for r in records) == pytest.approx(158 + 6 / 3)


def brute_force_pass_at_k(n, c, k):
    """The share of k-subsets of n samples (the first c correct) holding a correct one, exactly."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


def test_pass_at_k_is_the_unbiased_estimator():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(brute_force_pass_at_k(n, c, k)), abs=1e-12)
    for n, c, k in ((200, 3, 100), (200, 0, 1), (1000, 999, 10), (100, 37, 10)):  # 1 - C(n-c, k) / C(n, k) exactly
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # pass@1 is the share correct
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_the_release_program_and_stop_sequences_by_hand(problems):
    p = problems[2]
    assert p.entry_point == "truncate_number"
    assert program(p, "    return number % 1.0\n") == p.prompt + "    return number % 1.0\n" + "\n" + p.test + \
        "\ncheck(truncate_number)\n"
    assert humaneval.STOP == ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    text = "    return number % 1.0\n\n\ndef main():\n    pass\n"
    assert humaneval.cut(text, humaneval.STOP) == ("    return number % 1.0\n\n", True)
    assert humaneval.cut("    x = 1\n    # fine\n#top", humaneval.STOP) == ("    x = 1\n    # fine", True)
    assert humaneval.cut("    return 1", humaneval.STOP) == ("    return 1", False)


def write_samples(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_scores_a_samples_file_without_a_model(tmp_path, problems):
    rows = [{"task_id": p.id, "completion": c} for p in problems[:4]
            for c in (p.canonical_solution, "    return 0\n")]
    rows.append({"task_id": "HumanEval/100", "completion": "x"})  # outside --limit: ignored
    samples = write_samples(tmp_path / "samples.jsonl", rows)
    out = tmp_path / "scored"
    run_eval(f"--out_dir={out}", "--tasks=humaneval", f"--samples={samples}", f"--data_dir={DATA}", "--limit=4",
             "--sandbox_workers=2")
    result = json.loads((out / "eval.json").read_text())["results"]["humaneval"]
    assert result["n"] == 4 and result["metrics"] == {"pass@1": 0.5}
    assert [r["status"][0] for r in result["records"]] == ["passed"] * 4
    assert "| humaneval | pass@1 | 0.5000 |" in (out / "eval.md").read_text()


@pytest.mark.parametrize("rows, message", [
    ([{"task_id": "HumanEval/0"}], "samples.jsonl:1: missing field 'completion'"),
    ([{"task_id": "HumanEval/0", "completion": 3}], "samples.jsonl:1: task_id and completion must be strings"),
    ([{"task_id": "MBPP/1", "completion": ""}], "samples.jsonl:1: task_id 'MBPP/1' is not a HumanEval problem"),
    ([{"task_id": "HumanEval/0", "completion": ""}], "has no completion for HumanEval/1 and 1 more problems"),
])
def test_bad_samples_files_are_refused_naming_the_line(tmp_path, problems, rows, message):
    samples = write_samples(tmp_path / "samples.jsonl", rows)
    with pytest.raises(ValueError, match=message):
        humaneval.read_samples(str(samples), problems[:3])


def test_bad_samples_and_problems_files_stop_eval_with_one_line(tmp_path):
    samples = write_samples(tmp_path / "samples.jsonl", [{"task_id": "HumanEval/0"}])
    p = run_eval(f"--out_dir={tmp_path / 'o'}", "--tasks=humaneval", f"--samples={samples}", f"--data_dir={DATA}",
                 "--limit=3", check=False)
    assert_one_clear_line(p, "humaneval:", "samples.jsonl:1: missing field 'completion'")
    with gzip.open(os.path.join(DATA, "humaneval", "HumanEval.jsonl.gz"), "rt") as f:
        rows = [json.loads(line) for line in f][:3]
    del rows[1]["test"]
    (tmp_path / "HumanEval.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    with pytest.raises(ValueError, match="HumanEval.jsonl.gz:2: missing field 'test'"):
        read_problems(Settings(data_dir=str(tmp_path)))


def test_generation_greedy_and_sampled_on_a_tiny_model(tiny_scorer, problems):  # noqa: F811
    settings = replace(SETTINGS, limit=2, max_new_tokens=6, sandbox_workers=2)
    greedy = humaneval.TASK.run(tiny_scorer, settings)
    assert greedy["n"] == 2 and list(greedy["metrics"]) == ["pass@1"] and greedy["metrics"]["pass@1"] == 0.0
    assert all(len(r["completions"]) == 1 for r in greedy["records"]) and "greedy" in greedy["notes"]
    again = humaneval.TASK.run(tiny_scorer, settings)
    assert [r["completions"] for r in again["records"]] == [r["completions"] for r in greedy["records"]]
    sampled = humaneval.TASK.run(tiny_scorer, replace(settings, num_samples=10, temperature=1.0))
    assert list(sampled["metrics"]) == ["pass@1", "pass@10"]
    assert all(r["n"] == 10 and len(set(r["completions"])) > 1 for r in sampled["records"])
    # random weights rarely write a stop sequence within 6 tokens: said in a note, each such one scored as it is
    assert any("reached max_new_tokens without a stop sequence" in n for n in sampled["notes"])


def test_the_problems_download_once(server, tmp_path, tiny_scorer, monkeypatch):  # noqa: F811
    data = open(os.path.join(DATA, "humaneval", "HumanEval.jsonl.gz"), "rb").read()
    (server.root / "HumanEval.jsonl.gz").write_bytes(data)
    url = f"{server.url}/HumanEval.jsonl.gz"
    monkeypatch.setattr(humaneval, "FILES", replace(humaneval.FILES, urls={"HumanEval.jsonl.gz": url}))
    settings = Settings(cache_dir=str(tmp_path), limit=5)
    assert [p.id for p in read_problems(settings)] == [f"HumanEval/{i}" for i in range(5)]
    assert read_problems(settings)[4].entry_point == "mean_absolute_deviation"
    assert [name for name, _ in server.log] == ["HumanEval.jsonl.gz"]  # once: the second read is the cache's
    assert open(tmp_path / "humaneval" / "HumanEval.jsonl.gz", "rb").read() == data


def test_sampling_is_seeded(tiny_scorer):  # noqa: F811
    ids = tiny_scorer.encode("def f(x):\n")
    one = humaneval.sample(tiny_scorer, ids, 3, 1.0, 5, torch.Generator().manual_seed(7))
    two = humaneval.sample(tiny_scorer, ids, 3, 1.0, 5, torch.Generator().manual_seed(7))
    assert one == two and len(one) == 3  # same seed, same samples
