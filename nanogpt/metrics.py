"""A run's metrics: one JSON row per log line or evaluation in out_dir/metrics.jsonl, and out_dir/loss.png drawn
from it. Train rows have "loss" and "lr", eval rows "train_loss" and "val_loss"; both have "iter"."""
import json
import os
import sys

from nanogpt import energy
from nanogpt.files import atomic_path, read_jsonl, write_atomic

FILE, PLOT = "metrics.jsonl", "loss.png"


def append(out_dir, row):
    """Add a row. A log that cannot be written (a full disk) is said once per call, and training goes on."""
    try:
        with open(os.path.join(out_dir, FILE), "a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:
        print(f"warning: could not append to {os.path.join(out_dir, FILE)} ({e.strerror})", file=sys.stderr)


def write(out_dir, rows):
    """Replace the file with these rows (temp file + rename)."""
    write_atomic(os.path.join(out_dir, FILE), "".join(json.dumps(row) + "\n" for row in rows))


def read(out_dir):
    """The rows so far; a last line cut by a killed run is dropped with a warning."""
    path = os.path.join(out_dir, FILE)
    return read_jsonl(path, tolerate_cut_tail=True) if os.path.exists(path) else []


def keep_until(out_dir, iter_num):
    """Before a resumed run appends: drop the rows the interrupted run wrote after its checkpoint at iter_num (its
    train rows past iter_num, its evals from iter_num on, which the resumed run repeats), so every curve keeps
    strictly increasing iterations."""
    rows = read(out_dir)
    kept = [r for r in rows if r["iter"] < iter_num or (r["iter"] == iter_num and "val_loss" not in r)]
    if len(kept) != len(rows):
        write(out_dir, kept)


def log_eval(out_dir, iter_num, evaluated, lr, elapsed, joules, power_label, pue, g_per_kwh):
    """An evaluation: its line printed, its row appended, the plot redrawn. evaluated: {split: {metric: value}}."""
    more = {f"val_{k}": v for k, v in evaluated["val"].items() if k != "loss"}  # DPO: rewards, accuracies
    train_loss, val_loss = evaluated["train"]["loss"], evaluated["val"]["loss"]
    print(f"step {iter_num}: train loss {train_loss:.4f}, val loss {val_loss:.4f}"
          + "".join(f", {k} {v:.4f}" for k, v in more.items())
          + f", {energy.describe(joules, power_label, pue, g_per_kwh)}")
    append(out_dir, {"iter": iter_num, "train_loss": train_loss, "val_loss": val_loss, **more, "lr": lr,
                     "time": elapsed, "energy_kwh": energy.kwh(joules),
                     "co2_kg": energy.co2_kg(joules, pue, g_per_kwh)})
    plot(out_dir)


def log_train(out_dir, iter_num, loss, logged, lr, dt, tokens_per_iter, mfu, joules, pue, g_per_kwh,
              imbalance=None, mixture=None, compilations=None):
    """A training log line and its row: the step's loss, lr, speed, energy, and what applies of the other metrics
    (`logged`: DPO's statistics, SFT's trained tokens), the MoE load imbalance, the data mixture, XLA compilations."""
    extra = "".join(f", {k} {v:.4f}" if isinstance(v, float) else f", {k} {v:,}" for k, v in logged.items())
    moe = f", expert load max/mean {imbalance:.2f}" if imbalance is not None else ""
    mix = f", mixture {[round(f, 3) for f in mixture]}" if mixture is not None and len(mixture) > 1 else ""
    xla = f", {compilations} XLA compilations" if compilations is not None else ""
    print(f"iter {iter_num}: loss {loss:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter, "
          f"{tokens_per_iter / dt:,.0f} tok/s, mfu {f'{100 * mfu:.1f}%' if mfu else 'n/a'}{extra}, "
          f"{energy.kwh(joules):.4g} kWh{moe}{mix}{xla}")
    append(out_dir, {"iter": iter_num, "loss": loss, "lr": lr, "ms_per_iter": dt * 1000,
                     "tokens_per_s": tokens_per_iter / dt, "mfu": mfu, "expert_imbalance": imbalance,
                     "energy_kwh": energy.kwh(joules), "co2_kg": energy.co2_kg(joules, pue, g_per_kwh),
                     **logged, "mixture": mixture, "xla_compilations": compilations})


def plot_tasks(ax, eval_rows, keys):
    """The eval_tasks metrics (val_<task>/<metric>) of each evaluation, one line each."""
    for key in keys:
        rows = [r for r in eval_rows if r.get(key) is not None]
        ax.plot([r["iter"] for r in rows], [r[key] for r in rows], "o-", label=key.removeprefix("val_"))
    ax.set_ylabel("task metrics")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def plot(out_dir):
    """loss.png: train loss per log interval and the eval losses above, train.py's eval_tasks metrics (when it has
    them) in the middle, the learning rate from iteration 0 below.
    The loss axis starts above the first evaluation's (untrained) loss, so the part of the curve that matters fills
    it. Written to a temp file and renamed, so a viewer never reads half a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read(out_dir)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "val_loss" in r]
    task_keys = sorted({k for r in eval_rows for k in r if k.startswith("val_") and "/" in k})  # train.py eval_tasks
    fig, axes = plt.subplots(2 + bool(task_keys), 1, figsize=(8, 7 + 3 * bool(task_keys)), sharex=True,
                             height_ratios=(3, 2, 1)[:1] + ((2,) if task_keys else ()) + (1,))
    ax, ax_lr = axes[0], axes[-1]
    if task_keys:
        plot_tasks(axes[1], eval_rows, task_keys)
    ax.plot([r["iter"] for r in train_rows], [r["loss"] for r in train_rows], alpha=0.5, label="train (batch)")
    ax.plot([r["iter"] for r in eval_rows], [r["train_loss"] for r in eval_rows], "o-", label="train (eval)")
    ax.plot([r["iter"] for r in eval_rows], [r["val_loss"] for r in eval_rows], "o-", label="val")
    trained = [r["loss"] for r in train_rows[len(train_rows) // 10 + 1:]] + [
        r[k] for r in eval_rows[1:] for k in ("train_loss", "val_loss")]
    finite = [v for v in trained if v == v and abs(v) != float("inf")]
    if finite:
        low, high = min(finite), max(finite)
        ax.set_ylim(low - 0.05 * (high - low + 1e-3), high + 0.25 * (high - low + 1e-3))
    ax.set_title(out_dir, fontsize=9)
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    lr_rows = sorted((r for r in rows if r.get("lr") is not None), key=lambda r: r["iter"])
    ax_lr.plot([r["iter"] for r in lr_rows], [r["lr"] for r in lr_rows])
    ax_lr.set_xlabel("iteration")
    ax_lr.set_ylabel("lr")
    fig.tight_layout()
    path = os.path.join(out_dir, PLOT)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    except OSError as e:  # a plot is not worth stopping a run for
        print(f"warning: could not write {path} ({e.strerror})", file=sys.stderr)
    finally:
        plt.close(fig)
