"""Training phases: one run moves through a list of data mixtures (pretrain -> refined pretrain -> midtrain -> SFT),
each for a length in iterations or tokens; the lr schedule spans the whole run (max_iters = the phases' sum).

    phases = [{"name": "pretrain", "datasets": {"web": 3, "books": 1}, "iters": 200},
              {"name": "refine", "datasets": ["web_hq", "books"], "temperature": 2.0, "tokens": 2_000_000},
              {"name": "sft", "datasets": {"chat": 1}, "iters": 50}]

A phase's mixture is `datasets`: {name: weight} (normalised), or a list of names with `temperature` T: dataset i is
drawn with probability p_i ~ n_i^(1/T), n_i its train tokens (T = 1: by size; large T: uniform). A length in tokens
becomes ceil(tokens / tokens_per_iter) iterations. The run's BatchLoader holds every phase's datasets; PhasedLoader
sets its weights for the phase of the iteration it is drawing for (iteration = micro-batch // accumulation), so a
resumed run (which restores the loader's step) continues mid-phase exactly. It counts the tokens drawn per
iteration and source; write_report turns them into mixture.json (target vs actual share per phase and source) and
mixture.png (the share over training, stacked, phase boundaries marked).
"""
import math
import os

import numpy as np

from nanogpt.shards import read_header, shard_paths

PHASE_KEYS = ("name", "datasets", "temperature", "iters", "tokens")


class PhaseError(ValueError):
    pass


def check_phases(phases):
    """A PhaseError (one line, naming the phase) for a malformed list: unknown key, no or two lengths, bad weights."""
    if not isinstance(phases, (list, tuple)):
        raise PhaseError(f"phases must be a list of dicts, got {type(phases).__name__}")
    for i, phase in enumerate(phases):
        where = f"phases[{i}]" + (f" '{phase['name']}'" if isinstance(phase, dict) and "name" in phase else "")
        if not isinstance(phase, dict):
            raise PhaseError(f"{where}: expected a dict with {', '.join(PHASE_KEYS)}, got {phase!r}")
        unknown = sorted(set(phase) - set(PHASE_KEYS))
        if unknown:
            raise PhaseError(f"{where}: unknown key {unknown[0]!r} (a phase has {', '.join(PHASE_KEYS)})")
        if ("iters" in phase) == ("tokens" in phase):
            raise PhaseError(f"{where}: give its length as exactly one of 'iters' or 'tokens'")
        length = phase.get("iters", phase.get("tokens"))
        if not isinstance(length, int) or length < 1:
            raise PhaseError(f"{where}: its length must be a positive integer, got {length!r}")
        mix = phase.get("datasets")
        if "temperature" in phase:
            t = phase["temperature"]
            if not isinstance(mix, (list, tuple)) or not mix:
                raise PhaseError(f"{where}: with a temperature, 'datasets' is a list of names")
            if not isinstance(t, (int, float)) or not t > 0:
                raise PhaseError(f"{where}: temperature must be a positive number, got {t!r}")
        else:
            if not isinstance(mix, dict) or not mix:
                raise PhaseError(f"{where}: 'datasets' must map dataset names to weights (or list names with a "
                                 "'temperature')")
            weights = list(mix.values())
            if not all(isinstance(w, (int, float)) and w >= 0 for w in weights) or not sum(weights) > 0:
                raise PhaseError(f"{where}: weights {mix} must be non-negative numbers that sum to a positive number")
    return phases


def dataset_names(phases):
    """Every dataset of every phase, in order of first use."""
    return list(dict.fromkeys(name for phase in phases for name in phase["datasets"]))


def train_tokens(data_dir):
    return sum(read_header(p)[1] for p in shard_paths(data_dir, "train"))


def phase_weights(phase, names, dirs):
    """The phase's sampling probabilities over `names` (zero for the datasets it does not use)."""
    p = np.zeros(len(names))
    if "temperature" in phase:
        for name in phase["datasets"]:
            i = names.index(name)
            p[i] = train_tokens(dirs[i]) ** (1.0 / phase["temperature"])
    else:
        for name, w in phase["datasets"].items():
            p[names.index(name)] = w
    return p / p.sum()


class Plan:
    """The phases resolved for a run: names, per-phase weights over all datasets, and iteration boundaries."""

    def __init__(self, phases, dirs, tokens_per_iter):
        self.names = dataset_names(phases)
        self.labels = [p.get("name", f"phase {i + 1}") for i, p in enumerate(phases)]
        self.weights = np.stack([phase_weights(p, self.names, dirs) for p in phases])
        lengths = [p["iters"] if "iters" in p else math.ceil(p["tokens"] / tokens_per_iter) for p in phases]
        self.ends = np.cumsum(lengths)  # phase k covers iterations [ends[k-1], ends[k])
        self.total_iters = int(self.ends[-1])

    def phase_at(self, iteration):
        return min(int(np.searchsorted(self.ends, iteration, side="right")), len(self.ends) - 1)

    def overall_weights(self):
        """Each dataset's share of the whole run (for the evaluation loaders)."""
        lengths = np.diff(np.concatenate([[0], self.ends]))
        return (lengths[:, None] * self.weights).sum(0) / lengths.sum()


class PhasedLoader:
    """A BatchLoader whose mixture follows the plan; counts rows drawn per iteration and dataset."""

    def __init__(self, loader, plan, accumulation, block_size, master=True):
        self.loader, self.plan, self.accumulation, self.block_size, self.master = (
            loader, plan, accumulation, block_size, master)
        self.pairs = loader.pairs
        self.rows = np.zeros((plan.total_iters, len(plan.names)), dtype=np.int64)
        self.announced = None

    def next_batch(self, device="cpu"):
        iteration = self.loader.step // self.accumulation
        phase = self.plan.phase_at(iteration)
        if phase != self.announced and self.master:
            start = int(self.plan.ends[phase - 1]) if phase else 0
            mix = {n: round(float(w), 3) for n, w in zip(self.plan.names, self.plan.weights[phase]) if w > 0}
            print(f"phase {phase + 1}/{len(self.plan.labels)} '{self.plan.labels[phase]}' (iterations {start}-"
                  f"{int(self.plan.ends[phase]) - 1}) from iter {iteration}: mixture {mix}")
        self.announced = phase
        self.loader.weights = self.plan.weights[phase]
        before = self.loader.drawn.copy()
        batch = self.loader.next_batch(device)
        if iteration < len(self.rows):
            self.rows[iteration] += self.loader.drawn - before
        return batch

    def mixture(self):
        return self.loader.mixture()

    def state_dict(self):
        return {**self.loader.state_dict(), "phase_rows": self.rows.tolist()}

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)
        rows = np.array(state.get("phase_rows", []), dtype=np.int64)
        if rows.shape != self.rows.shape:
            raise ValueError(f"the checkpoint's phase counts have shape {rows.shape}, this plan {self.rows.shape}: "
                             "resume with the phases it was trained with")
        self.rows = rows

    def report(self):
        """{phase label: {dataset: {"target": share, "actual": share of tokens drawn}}} and the iterations' rows."""
        out, start = {}, 0
        for k, (label, end) in enumerate(zip(self.plan.labels, self.plan.ends)):
            drawn = self.rows[start:end].sum(0)
            out[label] = {"iterations": [int(start), int(end)], "tokens": int(drawn.sum()) * self.block_size,
                          "sources": {name: {"target": round(float(self.plan.weights[k][i]), 4),
                                             "actual": round(float(drawn[i] / max(1, drawn.sum())), 4)}
                                      for i, name in enumerate(self.plan.names)
                                      if self.plan.weights[k][i] > 0 or drawn[i]}}
            start = end
        return out


def write_report(out_dir, loader):
    """mixture.json (per phase and source: target and actual token share) and mixture.png (stacked shares over
    training, each point the mean over a window of iterations, phase boundaries dashed)."""
    from nanogpt.files import write_json
    report = loader.report()
    write_json(os.path.join(out_dir, "mixture.json"), report)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = loader.rows.astype(np.float64)
    window = max(1, len(rows) // 100)
    n = len(rows) // window * window
    smoothed = rows[:n].reshape(-1, window, rows.shape[1]).sum(1)
    share = smoothed / np.maximum(1, smoothed.sum(1, keepdims=True))
    x = np.arange(len(share)) * window
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.stackplot(x, share.T, labels=loader.plan.names)
    for end in loader.plan.ends[:-1]:
        ax.axvline(end, color="k", ls="--", lw=0.8)
    ax.set_xlabel("iteration")
    ax.set_ylabel("share of tokens drawn")
    ax.set_ylim(0, 1)
    ax.set_title("data mixture over training: " + " -> ".join(loader.plan.labels))
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "mixture.png"), dpi=80)
    plt.close(fig)
    print("mixture report (target vs actual token share per phase):")
    for label, phase in report.items():
        cells = ", ".join(f"{name} {s['target']:.2f}/{s['actual']:.2f}" for name, s in phase["sources"].items())
        print(f"  {label}: {cells}")
    return report
