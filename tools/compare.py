"""Compare runs side by side: one figure and one markdown table from their metrics.jsonl and checkpoints.

    python tools/compare.py out-a out-b ...                        # writes compare.png, prints the table
    python tools/compare.py out-a out-b --png=ab.png --table=ab.md

The figure: train (thin) and val (dots) loss against step, tokens and wall time; the learning rate; tokens/s; and
val loss against energy when the runs recorded it; one colour per run, labelled by its out_dir. The table: final
and best val loss, steps, tokens, wall time, median tokens/s, energy and CO2e (when recorded), parameters
(active / total, without the input embedding) and every setting whose value differs between the runs.

Tokens per step come from the train rows (tokens/s x ms/iter); wall time is the evaluation rows' `time`, carried
across resumes (a resumed run's clock restarts), and interpolated by step for the train rows.
"""
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from configurator import configure, require  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from nanogpt import metrics  # noqa: E402
from nanogpt.checkpoint import architecture, step_dirs  # noqa: E402
from nanogpt.files import FileFormatError, read_jsonl, write_atomic  # noqa: E402

png = "compare.png"            # the figure
table = ""                     # also write the markdown table to this file ('' = print it only)

IGNORED_SETTINGS = ("out_dir", "overwrite")  # differ between any two runs, say nothing about them

# -------------------------------------------------------------------------------------------------------- runs


def run_meta(out_dir):
    """The checkpoint's settings and model_args (ckpt.pt memory-mapped, or the newest step_N/meta.pt); {} if none."""
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.exists(path):
        sharded = step_dirs(out_dir)
        path = os.path.join(sharded[-1], "meta.pt") if sharded else None
    if path is None:
        return {}
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises RuntimeError, pickle or zip errors for a cut or damaged file
        require(False, f"{path} is not a readable checkpoint ({type(e).__name__}): compare without {out_dir}")


def read_metrics(out_dir):
    """The rows of a run's metrics.jsonl (a cut last line, from a killed run, dropped with a warning); [] when
    there is none."""
    path = os.path.join(out_dir, metrics.FILE)
    if not os.path.exists(path):
        return []
    try:
        rows = read_jsonl(path, tolerate_cut_tail=True)
    except FileFormatError as e:
        require(False, f"{e}: not a metrics log this repo wrote")
    bad = next((n for n, r in enumerate(rows, 1) if not isinstance(r, dict) or not isinstance(r.get("iter"), int)), 0)
    require(not bad, f"{path}: row {bad} has no integer iter: not a metrics log this repo wrote")
    return rows


def cumulative_times(times):
    """Eval times made monotonic: a resumed run's clock restarts at 0, so it continues from the last time."""
    out, offset, last = [], 0.0, 0.0
    for t in times:
        if t + offset < last:
            offset = last
        last = t + offset
        out.append(last)
    return out


def read_run(out_dir):
    """Everything compare needs of one run, as plain lists and numbers."""
    rows = read_metrics(out_dir)
    train = [r for r in rows if r.get("loss") is not None]
    evals = [r for r in rows if r.get("val_loss") is not None]
    require(train or evals, f"{out_dir} has no metrics ({metrics.FILE} missing or empty): is it a run folder?")
    per_step = [r["tokens_per_s"] * r["ms_per_iter"] / 1000 for r in train
                if r.get("tokens_per_s") and r.get("ms_per_iter")]
    eval_times = cumulative_times([r.get("time", math.nan) for r in evals])
    meta = run_meta(out_dir)
    energy = [r for r in rows if r.get("energy_kwh") is not None]
    return {"name": out_dir, "train": train, "evals": evals, "eval_times": eval_times,
            "tokens_per_step": round(float(np.median(per_step))) if per_step else None,
            "steps": max(r["iter"] for r in train + evals), "energy": energy[-1] if energy else None,
            "config": meta.get("config", {}), "model_args": meta.get("model_args")}


def params(run):
    """(active, total) parameters of the run's model, built on the meta device; None without a checkpoint."""
    if run["model_args"] is None:
        return None
    with torch.device("meta"):
        model = GPT(GPTConfig(**architecture({"model_args": run["model_args"]})))
    return model.num_params(active=True), model.num_params()


def train_times(run):
    """Wall time at each train row, interpolated between the evaluations around it."""
    steps = [r["iter"] for r in run["evals"]]
    return np.interp([r["iter"] for r in run["train"]], steps, run["eval_times"]) if steps else []

# ------------------------------------------------------------------------------------------------------- table


def short(n):
    """1234567 -> '1.23M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def duration(seconds):
    if math.isnan(seconds):
        return "n/a"
    if seconds < 600:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def differing_settings(runs):
    """Settings whose values are not the same in every run that has a checkpoint; a setting some runs lack (added to
    train.py after they ran) is left out. A run without a checkpoint shows '-'."""
    configs = [set(run["config"]) for run in runs if run["config"]]
    keys = sorted(set.intersection(*configs) - set(IGNORED_SETTINGS)) if configs else []
    return [k for k in keys if len({repr(run["config"].get(k, "-")) for run in runs if run["config"]}) > 1]


def table_row(run, settings):
    val = [r["val_loss"] for r in run["evals"]]
    speed = [r["tokens_per_s"] for r in run["train"] if r.get("tokens_per_s")]
    energy = run["energy"]
    counts = params(run)
    return [run["name"], f"{val[-1]:.4f}" if val else "n/a", f"{min(val):.4f}" if val else "n/a", str(run["steps"]),
            short(run["steps"] * run["tokens_per_step"]) if run["tokens_per_step"] else "n/a",
            duration(run["eval_times"][-1]) if run["eval_times"] else "n/a",
            f"{np.median(speed):,.0f}" if speed else "n/a",
            f"{energy['energy_kwh']:.4g} kWh, {energy['co2_kg']:.4g} kg CO2e" if energy else "n/a",
            f"{short(counts[0])} / {short(counts[1])}" if counts else "n/a",
            *(str(run["config"].get(k, "-")) for k in settings)]


def markdown_table(runs):
    settings = differing_settings(runs)
    header = ["run", "final val loss", "best val loss", "steps", "tokens", "wall time", "tokens/s", "energy",
              "params (active / total)", *settings]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in table_row(run, settings)) + " |" for run in runs]
    return "\n".join(lines)

# ------------------------------------------------------------------------------------------------------ figure


def loss_limits(runs):
    """The loss axes start above the untrained first evaluation, as in metrics.plot, so the curves fill them."""
    values = [r["loss"] for run in runs for r in run["train"][len(run["train"]) // 10 + 1:]]
    values += [r["val_loss"] for run in runs for r in run["evals"][1:]]
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    low, high = min(finite), max(finite)
    return low - 0.05 * (high - low + 1e-3), high + 0.25 * (high - low + 1e-3)


def plot(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    (by_step, by_tokens, by_time), (lr_ax, speed_ax, energy_ax) = axes
    for i, run in enumerate(runs):
        color, label = f"C{i}", run["name"]
        tokens = run["tokens_per_step"] or math.nan
        for ax, x_train, x_eval in ((by_step, [r["iter"] for r in run["train"]], [r["iter"] for r in run["evals"]]),
                                    (by_tokens, [r["iter"] * tokens for r in run["train"]],
                                     [r["iter"] * tokens for r in run["evals"]]),
                                    (by_time, train_times(run), run["eval_times"])):
            ax.plot(x_train, [r["loss"] for r in run["train"]], color=color, alpha=0.35, linewidth=1)
            ax.plot(x_eval, [r["val_loss"] for r in run["evals"]], "o-", color=color, markersize=3, label=label)
        lr_ax.plot([r["iter"] for r in run["train"]], [r.get("lr") for r in run["train"]], color=color)
        speed_ax.plot([r["iter"] for r in run["train"]], [r.get("tokens_per_s") for r in run["train"]], color=color)
        with_energy = [r for r in run["evals"] if r.get("energy_kwh") is not None]
        energy_ax.plot([r["energy_kwh"] for r in with_energy], [r["val_loss"] for r in with_energy], "o-", color=color,
                       markersize=3, label=label)
    limits = loss_limits(runs)
    titles = ((by_step, "step", "loss (thin: train batches, dots: val)"), (by_tokens, "tokens", "loss"),
              (by_time, "wall time (s)", "loss"), (lr_ax, "step", "learning rate"), (speed_ax, "step", "tokens/s"),
              (energy_ax, "energy (kWh)", "val loss"))
    for ax, xlabel, ylabel in titles:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if limits and "loss" in ylabel:
            ax.set_ylim(*limits)
    by_step.legend(fontsize=8)  # the same colours in every panel
    if not any(run["energy"] for run in runs):
        energy_ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main():
    configure(globals(), [a for a in sys.argv[1:] if a.startswith("-")])
    out_dirs = [a for a in sys.argv[1:] if not a.startswith("-")]
    require(out_dirs, "name the run folders to compare: python tools/compare.py out-a out-b ...")
    for d in out_dirs:
        require(os.path.isdir(d), f"{d} is not a folder: name run folders (out_dir of train.py)")
    runs = [read_run(d) for d in out_dirs]
    plot(runs, png)
    text = markdown_table(runs)
    if table:
        write_atomic(table, text + "\n")
    print(text)
    print(f"\nwrote {png}" + (f" and {table}" if table else ""))


if __name__ == "__main__":
    main()
