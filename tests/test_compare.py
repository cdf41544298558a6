"""tools/compare.py on two tiny runs: the PNG is written and every table value is the one in the runs' own records."""
import json
import os

from tests.conftest import TINY, run_script
from tools import compare


def test_two_runs_give_a_figure_and_the_right_table(tmp_path, data_root, seed):
    runs = {"a": ["--learning_rate=4e-3"], "b": ["--learning_rate=1e-3", "--min_lr=1e-4"]}
    for name, extra in runs.items():
        run_script("train.py", *TINY, f"--data_root={data_root}", "--max_iters=8", "--eval_interval=4",
                   f"--seed={seed % 10000}", f"--out_dir={tmp_path / name}", *extra)
    for name, kwh_per_iter in (("a", None), ("b", 0.001)):  # a: a run from before the meter; b: known figures
        metrics = tmp_path / name / "metrics.jsonl"
        rows = [{k: v for k, v in json.loads(line).items() if k not in ("energy_kwh", "co2_kg")}
                for line in open(metrics)]
        if kwh_per_iter:
            rows = [dict(r, energy_kwh=kwh_per_iter * r["iter"], co2_kg=kwh_per_iter / 2 * r["iter"])
                    if "val_loss" in r else r for r in rows]
        metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))

    png, md = tmp_path / "cmp.png", tmp_path / "cmp.md"
    result = run_script("tools/compare.py", str(tmp_path / "a"), str(tmp_path / "b"), f"--png={png}", f"--table={md}")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 10_000
    lines = md.read_text().splitlines()
    assert lines == result.stdout.strip().splitlines()[:4]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    table = {cells[0]: dict(zip(header, cells)) for cells in
             ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    for name in runs:
        evals = [r for r in map(json.loads, open(tmp_path / name / "metrics.jsonl")) if "val_loss" in r]
        row = table[str(tmp_path / name)]
        assert row["final val loss"] == f"{evals[-1]['val_loss']:.4f}"
        assert row["best val loss"] == f"{min(r['val_loss'] for r in evals):.4f}"
        assert row["steps"] == "8" and row["tokens"] == "1.02k"  # 8 steps x 4 sequences x 32 tokens
        # 2 x (4 x 32² attention + 2 x 16 QK-norm + 2 x 32 norms + 2 x 32 x 128 ReLU² MLP) + 32 norm + 65 x 32 head
        assert row["params (active / total)"] == "26.9k / 26.9k"  # = 26,880
    assert table[str(tmp_path / "a")]["energy"] == "n/a"
    assert table[str(tmp_path / "b")]["energy"] == "0.008 kWh, 0.004 kg CO2e"
    assert table[str(tmp_path / "a")]["learning_rate"] == "0.004" and table[str(tmp_path / "b")]["min_lr"] == "0.0001"
    assert "seed" not in header and "out_dir" not in header  # the same in both, or never a difference


def test_cumulative_times_carry_across_a_resume():
    assert compare.cumulative_times([0.0, 10.0, 20.0, 1.0, 11.0]) == [0.0, 10.0, 20.0, 21.0, 31.0]
