"""Batches of (x, y) from memmapped token shards, from one dataset or a weighted mixture of several.

Each dataset is cut into non-overlapping windows of block_size + 1 tokens; every epoch visits them in a fresh random
order (and with a fresh random offset, so window boundaries move). The stream is global: step s takes the next
batch_size * world_size windows and rank r reads rows [r*B, (r+1)*B), so ranks never share a window within an epoch.
With several datasets, which dataset fills each row of a step is drawn from the weights with an RNG seeded by
(seed, step). The whole state is a few integers, saved in checkpoints, so a resumed run continues the exact stream.
"""
import numpy as np
import torch

from data.shards import read_shard, shard_paths


class WindowStream:
    """One dataset's windows in per-epoch random order; state = (epoch, position in the epoch)."""

    def __init__(self, data_dir, split, window, seed):
        self.paths = shard_paths(data_dir, split)
        self.shards = [read_shard(p) for p in self.paths]
        self.window, self.seed = window, seed
        if max(len(s) for s in self.shards) < window:
            raise ValueError(f"{data_dir}: '{split}' shards hold fewer than {window} tokens: lower block_size")
        self.epoch, self.pos = 0, 0
        self._layout_epoch = None

    def _layout(self):
        """This epoch's window starts: a random offset per epoch, windows permuted across all shards."""
        if self._layout_epoch != self.epoch:
            rng = np.random.default_rng((self.seed, self.epoch))
            offset = int(rng.integers(0, self.window))
            self.offsets = np.array([offset if len(s) - offset >= self.window else 0 for s in self.shards])
            counts = np.array([(len(s) - o) // self.window for s, o in zip(self.shards, self.offsets)])
            self.cumulative = np.cumsum(counts)
            self.first = self.cumulative - counts  # global index of each shard's first window
            self.order = rng.permutation(int(self.cumulative[-1]))
            self._layout_epoch = self.epoch
        return self.order

    def take(self, n):
        """The next n windows as (shard index, start) pairs, advancing the stream."""
        picked = []
        while len(picked) < n:
            order = self._layout()
            batch = order[self.pos:self.pos + n - len(picked)]
            shard = np.searchsorted(self.cumulative, batch, side="right")
            starts = self.offsets[shard] + (batch - self.first[shard]) * self.window
            picked.extend(zip(shard.tolist(), starts.tolist()))
            self.pos += len(batch)
            if self.pos == len(order):
                self.epoch, self.pos = self.epoch + 1, 0
        return picked

    def read(self, shard, start):
        return self.shards[shard][start:start + self.window]


class BatchLoader:
    def __init__(self, data_dirs, split, batch_size, block_size, rank=0, world_size=1, seed=1337, weights=None):
        """data_dirs: list of dataset folders; weights: their sampling weights (default equal)."""
        weights = np.asarray(weights if weights is not None else [1.0] * len(data_dirs), dtype=np.float64)
        if len(weights) != len(data_dirs) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"mixture weights {weights.tolist()} must be non-negative, one per dataset, not all zero")
        self.weights = weights / weights.sum()
        self.streams = [WindowStream(d, split, block_size + 1, seed + 1000 * i) for i, d in enumerate(data_dirs)]
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.step = 0
        self.drawn = np.zeros(len(data_dirs), dtype=np.int64)  # sequences per dataset, for the realised mixture

    def next_batch(self, device="cpu"):
        """(x, y) int64 tensors of shape (batch_size, block_size) on `device`."""
        global_rows = self.batch_size * self.world_size
        if len(self.streams) == 1:
            source = np.zeros(global_rows, dtype=np.int64)
        else:
            source = np.random.default_rng((self.seed, self.step)).choice(len(self.streams), global_rows, p=self.weights)
        windows = [None] * global_rows
        for d, stream in enumerate(self.streams):
            rows = np.flatnonzero(source == d)
            for row, (shard, start) in zip(rows, stream.take(len(rows))):
                windows[row] = (d, shard, start)
        self.drawn += np.bincount(source, minlength=len(self.streams))
        self.step += 1
        mine = windows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        data = np.stack([self.streams[d].read(shard, start) for d, shard, start in mine]).astype(np.int64)
        batch = torch.from_numpy(data)
        if torch.device(device).type == "cuda":
            batch = batch.pin_memory().to(device, non_blocking=True)
        else:
            batch = batch.to(device)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def mixture(self):
        """Realised fraction of sequences drawn from each dataset so far."""
        return (self.drawn / max(1, self.drawn.sum())).tolist()

    def state_dict(self):
        return {"step": self.step, "drawn": self.drawn.tolist(),
                "streams": [(s.epoch, s.pos) for s in self.streams]}

    def load_state_dict(self, state):
        if len(state["streams"]) != len(self.streams):
            raise ValueError(f"checkpoint's loader has {len(state['streams'])} datasets, this run {len(self.streams)}")
        self.step, self.drawn = state["step"], np.array(state["drawn"], dtype=np.int64)
        for stream, (epoch, pos) in zip(self.streams, state["streams"]):
            stream.epoch, stream.pos = epoch, pos
