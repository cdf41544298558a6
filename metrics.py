"""A run's metrics: one JSON row per log line or evaluation in out_dir/metrics.jsonl, and out_dir/loss.png drawn
from it. Train rows have "loss" and "lr", eval rows "train_loss" and "val_loss"; both have "iter"."""
import json
import os

FILE, PLOT = "metrics.jsonl", "loss.png"


def append(out_dir, row):
    with open(os.path.join(out_dir, FILE), "a") as f:
        f.write(json.dumps(row) + "\n")


def read(out_dir):
    path = os.path.join(out_dir, FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(out_dir):
    """loss.png: train loss per log interval and the eval losses above, the learning rate below (written to a
    temp file and renamed, so a viewer never reads half a PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read(out_dir)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "val_loss" in r]
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=(3, 1))
    ax.plot([r["iter"] for r in train_rows], [r["loss"] for r in train_rows], alpha=0.5, label="train (batch)")
    ax.plot([r["iter"] for r in eval_rows], [r["train_loss"] for r in eval_rows], "o-", label="train (eval)")
    ax.plot([r["iter"] for r in eval_rows], [r["val_loss"] for r in eval_rows], "o-", label="val")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    ax_lr.plot([r["iter"] for r in train_rows], [r["lr"] for r in train_rows])
    ax_lr.set_xlabel("iteration")
    ax_lr.set_ylabel("lr")
    fig.tight_layout()
    path = os.path.join(out_dir, PLOT)
    fig.savefig(path + ".tmp.png")
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
