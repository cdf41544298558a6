"""Batches of (x, y) from memmapped token shards, from one dataset or a weighted mixture of several.

Each dataset is cut into non-overlapping windows of block_size + 1 tokens; every epoch visits them in a fresh random
order (and with a fresh random offset, so window boundaries move). The stream is global: step s takes the next
batch_size * world_size windows and rank r reads rows [r*B, (r+1)*B), so ranks never share a window within an epoch.
With several datasets, which dataset fills each row of a step is drawn from the weights with an RNG seeded by
(seed, step). The whole state is a few integers, saved in checkpoints, so a resumed run continues the exact stream.

Post-training folders (nanogpt/shards.py: rows.json, mask shards) are read as their prepared rows, whole and in a
fresh random order each epoch, never at an offset; their block_size must be the one they were prepared with.
Conversations give the same (x, y) as a token stream with y = -1 where the mask is 0 (no loss there), so
pretraining, fine-tuning and mixtures of both run the same loop. Preference pairs give
(x_chosen, y_chosen, x_rejected, y_rejected), y = -1 outside each response; pairs mix only with pairs.
"""
import os

import numpy as np
import torch

from nanogpt.shards import MASK_PREFIX, ShardError, read_rows_info, read_shard, shard_paths

ROW_KINDS = ("conversations", "pairs")


def dataset_kind(data_dir, block_size):
    """'tokens', 'conversations' or 'pairs'; a ValueError when the folder's rows are not block_size + 1 long."""
    info = read_rows_info(data_dir)
    if info is None:
        return "tokens"
    if info.get("kind") not in ROW_KINDS:
        raise ValueError(f"{data_dir}: rows.json names kind {info.get('kind')!r}, expected one of {ROW_KINDS}")
    prepared = info["row_tokens"] - 1
    if prepared != block_size:
        name = os.path.basename(os.path.normpath(data_dir))
        raise ValueError(f"{data_dir} was prepared for block_size {prepared}, this run has {block_size}: train with "
                         f"block_size={prepared} or rerun `python data/{name}/prepare.py --block_size {block_size}`")
    return info["kind"]


class WindowStream:
    """One dataset's windows in per-epoch random order; state = (epoch, position in the epoch). rows=True: the
    windows are the prepared rows (no offset), read with their masks."""

    def __init__(self, data_dir, split, window, seed, rows=False):
        self.paths = shard_paths(data_dir, split)
        self.shards = [read_shard(p) for p in self.paths]
        self.window, self.seed, self.rows = window, seed, rows
        self.masks = self._read_masks(data_dir, split) if rows else None
        if max(len(s) for s in self.shards) < window:
            reason = ("no rows (none held out with --val_fraction 0, or every conversation or pair longer than a row): "
                      "rerun its prepare.py with --val_fraction 0.05 or a larger --block_size" if rows else
                      f"fewer than {window} tokens: lower block_size")
            raise ValueError(f"{data_dir}: '{split}' shards hold {reason}")
        self.epoch, self.pos = 0, 0
        self._layout_epoch = None
        self.ordered = False  # True: windows in stored order, no offset (a curriculum: prepare.py --order)

    def _read_masks(self, data_dir, split):
        """The mask shards, checked to match the token shards row for row."""
        masks = [read_shard(p) for p in shard_paths(data_dir, MASK_PREFIX + split)]
        if len(masks) != len(self.shards):
            raise ShardError(f"{data_dir}: {len(self.shards)} '{split}' token shards but {len(masks)} mask shards")
        for path, tokens, mask in zip(self.paths, self.shards, masks):
            if len(mask) != len(tokens) or len(tokens) % self.window:
                raise ShardError(f"{path}: {len(tokens)} tokens and {len(mask)} mask values do not make whole rows "
                                 f"of {self.window}: rerun the dataset's prepare.py")
        return masks

    def _layout(self):
        """This epoch's window starts: a random offset per epoch (none for rows), windows permuted across all shards."""
        if self._layout_epoch != self.epoch:
            rng = np.random.default_rng((self.seed, self.epoch))
            offset = 0 if self.rows or self.ordered else int(rng.integers(0, self.window))
            self.offsets = np.array([offset if len(s) - offset >= self.window else 0 for s in self.shards])
            counts = np.array([(len(s) - o) // self.window for s, o in zip(self.shards, self.offsets)])
            self.cumulative = np.cumsum(counts)
            self.first = self.cumulative - counts  # global index of each shard's first window
            n = int(self.cumulative[-1])
            self.order = np.arange(n) if self.ordered else rng.permutation(n)
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
        """(tokens, targets) of a window: targets are the tokens, or -1 where a row's mask is 0."""
        tokens = self.shards[shard][start:start + self.window].astype(np.int64)
        if self.masks is None:
            return tokens, tokens
        return tokens, np.where(self.masks[shard][start:start + self.window] > 0, tokens, -1)


def check_mixture(data_dirs, kinds):
    """Pairs mix only with pairs: a batch is either (x, y) or (x_chosen, y_chosen, x_rejected, y_rejected)."""
    pairs = [d for d, kind in zip(data_dirs, kinds) if kind == "pairs"]
    if pairs and len(pairs) != len(data_dirs):
        others = [d for d in data_dirs if d not in pairs]
        raise ValueError(f"{pairs[0]} holds preference pairs but {others[0]} does not: pairs mix only with pairs")


class BatchLoader:
    def __init__(self, data_dirs, split, batch_size, block_size, rank=0, world_size=1, seed=1337, weights=None):
        """data_dirs: list of dataset folders; weights: their sampling weights (default equal)."""
        weights = np.asarray(weights if weights is not None else [1.0] * len(data_dirs), dtype=np.float64)
        if len(weights) != len(data_dirs) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"mixture weights {weights.tolist()} must be non-negative, one per dataset, not all zero")
        self.weights = weights / weights.sum()
        kinds = [dataset_kind(d, block_size) for d in data_dirs]
        check_mixture(data_dirs, kinds)
        self.pairs = kinds[0] == "pairs"  # next_batch gives (x_chosen, y_chosen, x_rejected, y_rejected)
        window = 2 * (block_size + 1) if self.pairs else block_size + 1  # a pair row: chosen, then rejected
        self.streams = [WindowStream(d, split, window, seed + 1000 * i, rows=kind != "tokens")
                        for i, (d, kind) in enumerate(zip(data_dirs, kinds))]
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.step = 0
        self.drawn = np.zeros(len(data_dirs), dtype=np.int64)  # sequences per dataset, for the realised mixture

    def next_batch(self, device="cpu"):
        """(x, y) int64 tensors of shape (batch_size, block_size) on `device`, y = -1 where nothing is learned; for
        pairs (x_chosen, y_chosen, x_rejected, y_rejected)."""
        global_rows = self.batch_size * self.world_size
        if len(self.streams) == 1:
            source = np.zeros(global_rows, dtype=np.int64)
        else:
            rng = np.random.default_rng((self.seed, self.step))
            source = rng.choice(len(self.streams), global_rows, p=self.weights)
        windows = [None] * global_rows
        for d, stream in enumerate(self.streams):
            rows = np.flatnonzero(source == d)
            for row, (shard, start) in zip(rows, stream.take(len(rows))):
                windows[row] = (d, shard, start)
        self.drawn += np.bincount(source, minlength=len(self.streams))
        self.step += 1
        mine = windows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        tokens, targets = zip(*(self.streams[d].read(shard, start) for d, shard, start in mine))
        batch = torch.from_numpy(np.stack([np.stack(tokens), np.stack(targets)]))  # (2, B, window): one transfer
        if torch.device(device).type == "cuda":
            batch = batch.pin_memory().to(device, non_blocking=True)
        else:
            batch = batch.to(device)
        sequences = batch.chunk(2, dim=2) if self.pairs else (batch,)
        return tuple(t for seq in sequences for t in (seq[0, :, :-1].contiguous(), seq[1, :, 1:].contiguous()))

    def read_in_order(self, indices):
        """The datasets at these indices are read in their stored order every epoch (a curriculum), not shuffled."""
        for i in indices:
            self.streams[i].ordered = True
            self.streams[i]._layout_epoch = None

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


class PrefixLoader:
    """The first n_tokens tokens of a split's first shard, in order, as windows of block_size + 1 tokens that overlap
    by one, so every token after the first is predicted exactly once: the evaluation protocols that fix their tokens
    (modded-nanogpt's FineWeb val: the first 10,485,760 tokens of fineweb_val_000000.bin). Batch i holds windows
    [i B W, (i + 1) B W) of which rank r reads rows [r B, (r + 1) B); rows past the last window have no targets (-1)."""

    def __init__(self, data_dir, split, n_tokens, batch_size, block_size, rank=0, world_size=1):
        path = shard_paths(data_dir, split)[0]
        self.tokens = read_shard(path)
        if len(self.tokens) < n_tokens + 1:
            raise ValueError(f"{path} holds {len(self.tokens):,} tokens, fewer than the {n_tokens:,} (+1) to evaluate")
        self.n_tokens, self.block_size, self.batch_size, self.rank, self.world_size = (
            n_tokens, block_size, batch_size, rank, world_size)
        self.windows = -(-n_tokens // block_size)
        self.batches = -(-self.windows // (batch_size * world_size))  # evaluation steps that cover every window
        self.batch = 0

    def next_batch(self, device="cpu"):
        x = torch.zeros(self.batch_size, self.block_size, dtype=torch.int64)
        y = torch.full_like(x, -1)
        first = (self.batch * self.world_size + self.rank) * self.batch_size
        for row, window in enumerate(range(first, min(first + self.batch_size, self.windows))):
            start = window * self.block_size
            end = min(start + self.block_size, self.n_tokens)  # the last window may predict fewer tokens
            chunk = torch.from_numpy(self.tokens[start:end + 1].astype(np.int64))
            x[row, :end - start], y[row, :end - start] = chunk[:-1], chunk[1:]
        self.batch += 1
        return x.to(device), y.to(device)

    def state_dict(self):
        return {"batch": self.batch}

    def load_state_dict(self, state):
        self.batch = state["batch"]
