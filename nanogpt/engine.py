"""Continuous batching: many sequences decode in one batch; requests join and leave between steps.

    engine = Engine(model, slots=16, prefill_chunk=64, vocab_limit=tokenizer.vocab_size)
    seq = engine.add(prompt_ids, SamplingParams(temperature=0, max_tokens=50), stop_ids={end_of_reply})
    while engine.busy():
        for seq, token in engine.step(): ...          # the tokens of this step; seq.finish_reason once it ends

Each sequence owns one slot of a SlotCache: per K/V sharing group a (slots, n_kv_head, size, head_dim) buffer, a ring
of local_window positions for sliding-window groups and block_size positions for global ones, exactly as
model.KVCache holds one sequence. A step prefills one chunk (<= prefill_chunk tokens) of one waiting prompt, then
feeds every sequence whose prompt is in its last token, all in one batch of rows at different positions: RoPE
takes a start per row (model.rope_tables) and each row's queries see only its own keys through a boolean mask
(model.attend). A finished sequence frees its slot at once; the next waiting request takes it in the next step.
Greedy tokens equal those of the sequence run alone (tests/test_engine.py); a seeded request draws from its own
generator, so batching does not change its tokens either.

EngineThread runs an Engine in a background thread for a server: submit() from any thread with a callback for its
tokens, cancel() frees the slot of a client that went away.
"""
import queue
import threading
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from model import layer_plan
from nanogpt.sampling import SamplingParams, next_tokens


class SlotCache:
    """model.KVCache for a batch of sequences, each in its own slot at its own position. Before each forward the
    engine calls select(rows, positions): the slot of each batch row and the position of its first new token. The
    attention layers call update(kv_group, k, v, window) and get back the keys and values to attend over and a
    visibility mask (B, 1, T, keys) in place of the window; the model advances pos."""

    def __init__(self, cfg, slots):
        self.slots, self.k, self.v = slots, {}, {}
        self.size = {kv_group: min(cfg.local_window, cfg.block_size) if kind == "L" else cfg.block_size
                     for kind, kv_group, produces in layer_plan(cfg) if produces}

    def select(self, rows, positions, device):
        self.rows = torch.tensor(rows, device=device)
        self.pos = torch.tensor(positions, device=device)  # GPT.forward reads it for RoPE and adds T after
        self.longest, self.masks = max(positions), {}
        self.first_rows = rows == list(range(len(rows)))  # slots 0..B-1 in order: the cache rows are a view

    def mask(self, size, window, T):
        """(B, 1, T, keys) visibility for the T new queries of each row. A decode step (T = 1) attends over the ring
        after its write; a prompt chunk over the ring before it, then its own T keys (its writes may overwrite ring
        entries its earlier queries still see)."""
        decode = T == 1
        start = self.pos[:, None]
        last = start - 1 + decode  # the newest position in the ring
        n = min(size, self.longest + decode)  # ring entries past every row's newest position hold nothing yet
        ring = last - (last - torch.arange(n, device=start.device)) % size  # position in each entry; < 0: none
        new = start + torch.arange(T, device=start.device)
        keys, queries = (ring if decode else torch.cat((ring, new), 1))[:, None, :], new[:, :, None]
        visible = (keys >= 0) & (keys <= queries)
        if window is not None:
            visible &= keys > queries - window
        return visible[:, None]

    def rows_of(self, cache, n):
        return cache[:len(self.rows), :, :n] if self.first_rows else cache[self.rows, :, :n]

    def update(self, kv_group, k, v, window):
        size, (_, H, T, D) = self.size[kv_group], k.shape
        if kv_group not in self.k:  # the first forward sets the dtype and device
            self.k[kv_group] = k.new_zeros(self.slots, H, size, D)
            self.v[kv_group] = v.new_zeros(self.slots, H, size, v.size(3))  # MLA: the rope key, narrower
        if (size, window, T) not in self.masks:  # the layers of one kind share a mask
            self.masks[size, window, T] = self.mask(size, window, T)
        cache_k, cache_v, mask = self.k[kv_group], self.v[kv_group], self.masks[size, window, T]
        if T > 1:
            n = min(size, self.longest)
            keys, values = torch.cat((self.rows_of(cache_k, n), k), 2), torch.cat((self.rows_of(cache_v, n), v), 2)
        keep = min(T, size)  # a prompt chunk longer than a ring keeps its last `size` positions
        ring = (self.pos[:, None] + torch.arange(T - keep, T, device=k.device)) % size
        cache_k[self.rows[:, None], :, ring] = k[:, :, T - keep:].transpose(1, 2)
        cache_v[self.rows[:, None], :, ring] = v[:, :, T - keep:].transpose(1, 2)
        if T == 1:  # a decode step's key took the entry of position pos - size, which its query does not see
            n = min(size, self.longest + 1)
            keys, values = self.rows_of(cache_k, n), self.rows_of(cache_v, n)
        return keys, values, mask


@dataclass(eq=False)
class Sequence:
    prompt: list
    params: SamplingParams
    stop_ids: frozenset = frozenset()  # ids that end the reply, not part of it (e.g. <|assistant_end|>)
    generated: list = field(default_factory=list)
    finish_reason: str | None = None   # 'stop' (a stop id or string), 'length' (max_tokens or the context), 'cancelled'
    slot: int | None = None
    pos: int = 0                       # tokens in the cache
    generator: torch.Generator | None = None


class Engine:
    def __init__(self, model, slots=16, prefill_chunk=64, vocab_limit=None, autocast=None):
        """model: a model.GPT in eval mode; slots: sequences decoded together at most; prefill_chunk: prompt tokens
        per step; vocab_limit: ids from here on (a padded vocabulary's spare rows) are never sampled. Stop strings
        need text, so they are the caller's (serve.py ends a request through sampling.TextStream and cancel)."""
        if slots < 1 or prefill_chunk < 1:
            raise ValueError(f"slots ({slots}) and prefill_chunk ({prefill_chunk}) must be >= 1")
        self.model, self.block_size = model, model.config.block_size
        self.device = next(model.parameters()).device
        self.cache = SlotCache(model.config, slots)
        self.free = list(range(slots - 1, -1, -1))
        self.waiting, self.running = deque(), []  # running: holds a slot (prefilling or decoding)
        self.prefill_chunk, self.vocab_limit = prefill_chunk, vocab_limit
        self.autocast = autocast or nullcontext()

    def add(self, prompt, params, stop_ids=()):
        """Queue a request; a ValueError for an empty prompt, one longer than the context or bad sampling values."""
        params.check()
        if not 1 <= len(prompt) <= self.block_size:
            raise ValueError(f"the prompt has {len(prompt)} tokens; it must have 1 to {self.block_size} "
                             "(the model's context, block_size)")
        seq = Sequence(list(prompt), params, frozenset(stop_ids), generator=params.generator(self.device))
        self.waiting.append(seq)
        return seq

    def cancel(self, seq):
        """End a sequence now (a client went away): its slot is free for the next step."""
        if seq.finish_reason is None:
            self.finish(seq, "cancelled")

    def busy(self):
        return bool(self.waiting or self.running)

    def finish(self, seq, reason):
        seq.finish_reason = reason
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq.slot is not None:
            self.running.remove(seq)
            self.free.append(seq.slot)
            self.free.sort(reverse=True)  # the lowest slot goes next: busy slots stay 0..B-1 when they can
            seq.slot = None

    def forward(self, rows, positions, tokens):
        """Last-position logits (B, V) of token rows (B, T) fed to the slots `rows` at `positions`."""
        self.cache.select(rows, positions, self.device)
        with self.autocast:
            h = self.model(torch.tensor(tokens, device=self.device), cache=self.cache)
            logits = self.model.logits(h[:, -1]).float()
        if self.vocab_limit is not None:
            logits[:, self.vocab_limit:] = float("-inf")
        return logits

    def sample(self, seqs, logits):
        """Append each sequence's next token and end the finished ones; returns [(seq, token)]."""
        tokens = next_tokens(logits, [s.params for s in seqs], [s.generated for s in seqs],
                             [s.generator for s in seqs]).tolist()
        for seq, token in zip(seqs, tokens):
            if token in seq.stop_ids:
                self.finish(seq, "stop")
                continue
            seq.generated.append(token)
            # the next step would feed this token at position seq.pos: past the context there is no room
            if len(seq.generated) >= seq.params.max_tokens or seq.pos >= self.block_size:
                self.finish(seq, "length")
        return list(zip(seqs, tokens))

    @torch.no_grad()
    def step(self):
        """Admit waiting requests to free slots, prefill one prompt chunk, decode one token for every sequence whose
        prompt is in. Returns [(sequence, token)] of this step (a stop id ends its sequence and is not appended)."""
        while self.waiting and self.free:
            seq = self.waiting.popleft()
            seq.slot = self.free.pop()
            self.running.append(seq)
        decoding = sorted((s for s in self.running if s.generated), key=lambda s: s.slot)
        events = []
        prefilling = next((s for s in self.running if not s.generated), None)
        if prefilling is not None:
            chunk = prefilling.prompt[prefilling.pos:prefilling.pos + self.prefill_chunk]
            logits = self.forward([prefilling.slot], [prefilling.pos], [chunk])
            prefilling.pos += len(chunk)
            if prefilling.pos == len(prefilling.prompt):  # the prompt is in: its logits give the first token
                events += self.sample([prefilling], logits)
        if decoding:
            logits = self.forward([s.slot for s in decoding], [s.pos for s in decoding],
                                  [[s.generated[-1]] for s in decoding])
            for s in decoding:
                s.pos += 1
            events += self.sample(decoding, logits)
        return events

    def run(self, requests):
        """Generate for [(prompt, params)] to the end; returns each one's generated ids (a batch job, the bench)."""
        seqs = [self.add(prompt, params) for prompt, params in requests]
        while self.busy():
            self.step()
        return [s.generated for s in seqs]


class EngineThread:
    """An Engine stepping in a background thread, for a server. submit(..., deliver) from any thread; the engine
    thread calls deliver('token', id) for each generated token and deliver('end', finish_reason) or
    deliver('error', message) last. cancel() frees the slot of a client that went away."""

    def __init__(self, engine):
        self.engine, self.inbox, self.wake = engine, queue.Queue(), threading.Event()
        self.deliver = {}  # sequence -> its callback, while it runs
        self.cancelled = 0
        self.thread = threading.Thread(target=self.loop, daemon=True, name="engine")
        self.thread.start()

    def submit(self, prompt, params, deliver, stop_ids=()):
        """Queue a request and return its Sequence; ValueError (in the caller's thread) for what the engine
        refuses."""
        params.check()
        if not 1 <= len(prompt) <= self.engine.block_size:
            self.engine.add(prompt, params)  # raises the engine's one line
        seq = Sequence(list(prompt), params, frozenset(stop_ids))
        self.inbox.put(("add", seq, deliver))
        self.wake.set()
        return seq

    def cancel(self, seq):
        self.inbox.put(("cancel", seq, None))
        self.wake.set()

    def load(self):
        """(sequences decoding or prefilling, sequences waiting for a slot); read from another thread: a snapshot."""
        return len(self.engine.running), len(self.engine.waiting) + self.inbox.qsize()

    def handle(self, command, seq, deliver):
        if command == "add":
            seq.generator = seq.params.generator(self.engine.device)
            self.engine.waiting.append(seq)
            self.deliver[seq] = deliver
        elif command == "cancel" and seq.finish_reason is None and seq in self.deliver:
            self.engine.cancel(seq)
            self.cancelled += 1

    def loop(self):
        while True:
            if not self.engine.busy():
                self.wake.wait()
            self.wake.clear()
            while not self.inbox.empty():
                self.handle(*self.inbox.get())
            try:
                events = self.engine.step()
            except Exception as e:  # noqa: BLE001 - a failed step ends the requests in it, never the server
                for seq in list(self.deliver):
                    self.engine.cancel(seq)
                    self.deliver.pop(seq)("error", f"{type(e).__name__}: {e}")
                continue
            for seq, token in events:
                if token not in seq.stop_ids and seq in self.deliver:
                    self.deliver[seq]("token", token)
            for seq in [s for s in self.deliver if s.finish_reason is not None]:
                self.deliver.pop(seq)("end", seq.finish_reason)
