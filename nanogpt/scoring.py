"""The scoring core every evaluation uses (eval_mmlu.py, eval.py's tasks, the lm-evaluation-harness adapter): a
checkpoint loaded once, with the device, dtype and attention kernel resolved the way train.py and sample.py resolve
them, and four batched primitives on token ids:

- next_token_logits: the logits of a few candidate tokens after each prompt (MMLU's answer letters);
- loglikelihoods: the log-probability of each continuation token given its context (multiple choice, bits per byte);
- generate: greedy continuations cut at stop strings (GSM8K, chain of thought);
- rolling_windows: a long token stream cut into windows that predict every token once (bits per byte).

Batches hold sequences of similar lengths (sorted, longest first), right-padded: causal attention keeps the padding
after a row's last token from reaching it, so a score does not depend on the batch it lands in. Requests given the
same group key (MMLU's subject, the choices of one question) usually share a prefix: with shared_prefix its keys and
values are computed once and each batch of suffixes attends to them (SharedPrefix), which gives the same scores up to
float rounding for a fraction of the work.
"""
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from model import KVCache
from nanogpt.checkpoint import load_model
from nanogpt.runtime import autocast_for, device_type, resolve_attn_impl, resolve_device, resolve_dtype
from nanogpt.sampling import SamplingParams, first_stop, next_tokens

HEAD_CHUNK = 2**26  # logits per call of the output head when scoring continuations (256 MiB in fp32)
GREEDY = SamplingParams(temperature=0)  # the evaluations' generation

# ------------------------------------------------------------------------------------------------------- encoding


def make_encoder(tok):
    """tok.encode, except that a char-level vocabulary skips characters it lacks (benchmarks are not Shakespeare)."""
    if tok.spec["kind"] == "char":
        return lambda text: [tok.stoi[ch] for ch in text if ch in tok.stoi]
    return tok.encode


def encode_pair(encode, context, continuation, prefix_token=None):
    """(context ids, continuation ids) split the way lm-evaluation-harness splits them: trailing spaces of the
    context move to the continuation, the whole text is encoded once and the continuation is what follows the
    context's own encoding. An empty context becomes [prefix_token] (EOT), or the continuation's first token."""
    if not context:
        ids = encode(continuation)
        return ([prefix_token], ids) if prefix_token is not None and ids[:1] != [prefix_token] else (ids[:1], ids[1:])
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    context_ids = encode(stripped)
    return context_ids, encode(stripped + continuation)[len(context_ids):]


def rolling_windows(tokens, block_size, prefix_token=None):
    """(context ids, continuation ids) windows that predict every token of a stream once, as lm-evaluation-harness's
    loglikelihood_rolling cuts them: the first window predicts up to block_size tokens after prefix_token (EOT);
    each later one the next block_size tokens, given the tokens before them that still fit (so the last window
    reads a longer context). Without a prefix token the stream's first token is context only."""
    if prefix_token is None:
        prefix_token, tokens = tokens[0], tokens[1:]
    first = min(block_size, len(tokens))
    windows = [([prefix_token], tokens[:first])] if tokens else []
    done = first
    while done < len(tokens):
        end = min(done + block_size, len(tokens))
        windows.append((tokens[end - block_size - 1:done], tokens[done:end]))
        done = end
    return windows

# -------------------------------------------------------------------------------------------------------- batching


def batches_by_length(lengths, batch_size):
    """Index batches of similar lengths, longest first (an out-of-memory shows at once); ties keep their order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def right_padded(rows, fill=0):
    """(B, T) long tensor of token rows, right-padded with `fill`."""
    x = torch.full((len(rows), max(map(len, rows))), fill, dtype=torch.long)
    for i, row in enumerate(rows):
        x[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return x


def common_prefix_length(rows, limit):
    """Length of the longest prefix every row shares, at most `limit`."""
    n = 0
    while n < limit and all(row[n] == rows[0][n] for row in rows):
        n += 1
    return n


class SharedPrefix:
    """A stand-in for model.KVCache (attention calls update(kv_group, k, v, window); the model reads and advances
    pos) that holds the keys and values of one prefix, computed once, for batches of suffixes: each suffix row attends
    to the whole prefix and causally to itself, at the positions after it (attention aligns its queries to the end of
    the keys, sliding windows included)."""

    def __init__(self, model, prefix, device, autocast):
        self.k, self.v, self.pos, self.recording = {}, {}, 0, True
        with autocast:
            model(torch.tensor([prefix], device=device), cache=self)
        self.recording, self.length = False, len(prefix)

    def update(self, kv_group, k, v, window):
        if self.recording:
            self.k[kv_group], self.v[kv_group] = k, v
            return k, v, window
        rows = (k.size(0), -1, -1, -1)
        return (torch.cat((self.k[kv_group].expand(rows), k), dim=2),
                torch.cat((self.v[kv_group].expand(rows), v), dim=2), window)

    def __call__(self, model, suffixes):
        self.pos = self.length  # the model advanced it past the previous batch
        return model(suffixes, cache=self)

# ---------------------------------------------------------------------------------------------------------- scorer


@dataclass
class Batch:
    rows: list                    # request indices
    x: torch.Tensor               # (B, T) right-padded suffixes, on the device
    lengths: list                 # each row's suffix length
    prefix: SharedPrefix | None   # what the suffixes follow, or None: they are whole sequences


@dataclass
class Scorer:
    model: torch.nn.Module
    tok: object                   # tokenizer.Tokenizer
    device: str = "cpu"
    autocast: object = field(default_factory=nullcontext)
    batch_size: int = 16
    shared_prefix: bool = True    # compute a group's common prefix once (False: every sequence whole)

    @property
    def block_size(self):
        return self.model.config.block_size

    def encode(self, text):
        return make_encoder(self.tok)(text)

    def plan(self, seqs, groups, keep):
        """[(shared prefix, request indices)]: each group of two or more requests with a common prefix, which stops
        keep[i] tokens before each row's end so every position the caller reads stays in the suffix; the rest
        together with an empty prefix."""
        if groups is None or not self.shared_prefix:
            return [([], list(range(len(seqs))))]
        members = {}
        for i, g in enumerate(groups):
            members.setdefault(g, []).append(i)
        plan, alone = [], []
        for rows in members.values():
            n = common_prefix_length([seqs[i] for i in rows], min(len(seqs[i]) - keep[i] for i in rows))
            if len(rows) > 1 and n > 0:
                plan.append((seqs[rows[0]][:n], rows))
            else:
                alone += rows
        return ([([], alone)] if alone else []) + plan

    def batches(self, seqs, groups, keep, desc):
        """Batches of suffixes (see plan), with a progress bar; a prefix is computed before its first batch."""
        plan = self.plan(seqs, groups, keep)
        work = [(prefix, [rows[j] for j in batch]) for prefix, rows in plan
                for batch in batches_by_length([len(seqs[i]) - len(prefix) for i in rows], self.batch_size)]
        cache, cached = None, None
        for prefix, rows in tqdm(work, desc=desc, leave=False, disable=len(work) < 2):
            if prefix is not cached:
                cache = SharedPrefix(self.model, prefix, self.device, self.autocast) if prefix else None
                cached = prefix
            suffixes = [seqs[i][len(prefix):] for i in rows]
            yield Batch(rows, right_padded(suffixes).to(self.device), list(map(len, suffixes)), cache)

    def hidden_states(self, batch):
        """The model's final-norm states (B, T, n_embd) on a batch: after its shared prefix when it has one."""
        if batch.prefix is None:
            return self.model(batch.x)
        return batch.prefix(self.model, batch.x)

    @torch.inference_mode()
    def next_token_logits(self, prompts, token_ids, groups=None, desc="prompts"):
        """(N, len(token_ids)) float32 logits of the candidate tokens after each prompt (left-truncated to
        block_size), each row read at its own last token."""
        if not all(prompts):
            raise ValueError("next_token_logits needs a prompt of at least one token")
        prompts = [p[-self.block_size:] for p in prompts]
        out = torch.empty(len(prompts), len(token_ids))
        wanted = torch.tensor(token_ids, device=self.device)
        for b in self.batches(prompts, groups, [1] * len(prompts), desc):
            with self.autocast:
                hidden = self.hidden_states(b)
                rows = torch.arange(len(b.lengths), device=self.device)
                last = hidden[rows, torch.tensor(b.lengths, device=self.device) - 1]
                logits = self.model.logits(last)
            out[b.rows] = logits[:, wanted].float().cpu()
        return out

    def scored(self, batch, rows, positions, targets):
        """(log-probability of each target, whether it is the argmax) at (row, position) pairs of a batch. The head
        runs at those positions only (the model returns its final-norm states), HEAD_CHUNK logits at a time."""
        hidden = self.hidden_states(batch)
        hidden, chunk = hidden[rows, positions], max(1, HEAD_CHUNK // self.model.config.vocab_size)
        token_lp, best = [], []
        for i in range(0, len(hidden), chunk):
            lp = self.model.logits(hidden[i:i + chunk]).float()
            lp = lp.log_softmax(-1)
            token_lp.append(lp.gather(1, targets[i:i + chunk, None])[:, 0])
            best.append(lp.argmax(-1) == targets[i:i + chunk])
        return torch.cat(token_lp).double().cpu(), torch.cat(best).cpu()

    @torch.inference_mode()
    def loglikelihoods(self, pairs, groups=None, greedy=False, desc="continuations"):
        """For each (context ids, continuation ids): a float64 tensor of the log-probability of every continuation
        token (their sum, mean and sum per byte are the summed, per-token and per-byte scores), and with
        greedy=True a list of whether each continuation is the greedy one (every token the argmax). Contexts are
        left-truncated so that context + continuation fits in block_size + 1 tokens (the last token is only a
        target)."""
        if not all(ctx for ctx, _ in pairs):  # the first target needs a token before it (the harness gives EOT)
            raise ValueError("a context must have at least one token (encode_pair puts EOT before an empty one)")
        whole = [(ctx + cont)[-(self.block_size + 1):] for ctx, cont in pairs]
        n_scored = [len(cont) for _, cont in pairs]
        if any(n > self.block_size or n == 0 for n in n_scored):
            raise ValueError(f"a continuation must have 1 to block_size ({self.block_size}) tokens")
        logprobs, is_greedy = [None] * len(pairs), [None] * len(pairs)
        for b in self.batches([w[:-1] for w in whole], groups, n_scored, desc):
            spans = [range(b.lengths[r] - n_scored[i], b.lengths[r]) for r, i in enumerate(b.rows)]
            rows = torch.tensor([r for r, span in enumerate(spans) for _ in span], device=self.device)
            positions = torch.tensor([p for span in spans for p in span], device=self.device)
            targets = torch.tensor([t for i in b.rows for t in whole[i][-n_scored[i]:]], device=self.device)
            with self.autocast:
                token_lp, hits = self.scored(b, rows, positions, targets)
            for i, lp, hit in zip(b.rows, token_lp.split([n_scored[i] for i in b.rows]),
                                  hits.split([n_scored[i] for i in b.rows])):
                logprobs[i], is_greedy[i] = lp, bool(hit.all())
        return (logprobs, is_greedy) if greedy else logprobs

    @torch.inference_mode()
    def generate(self, prompts, max_new_tokens, stop=(), desc="generating"):
        """Greedy continuations (text) of token prompts, each cut before its first stop string; a row also ends at
        EOT or after max_new_tokens. Prompts are left-truncated to leave max_new_tokens of room in block_size."""
        room = self.block_size - max_new_tokens
        if not all(prompts):
            raise ValueError("generate needs a prompt of at least one token")
        if room < 1:
            raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in block_size "
                             f"{self.block_size}")
        if max_new_tokens <= 0:
            return [""] * len(prompts)
        prompts = [p[-room:] for p in prompts]
        texts = [None] * len(prompts)
        for rows in tqdm(batches_by_length(list(map(len, prompts)), self.batch_size), desc=desc, leave=False):
            for i, text in zip(rows, self.generate_batch([prompts[i] for i in rows], max_new_tokens, stop)):
                texts[i] = text
        return texts

    def last_logits(self, idx, cache):
        return self.model.logits(self.model(idx, cache=cache)[:, -1])

    def generate_batch(self, prompts, max_new_tokens, stop):
        """One batch on a KVCache: the prefill covers the shortest prompt; then every row takes one token a step,
        its own prompt's next token while it has one, else its greedy choice (so rows never see padding)."""
        cache, start = KVCache(self.model.config), min(map(len, prompts))
        with self.autocast:
            logits = self.last_logits(torch.tensor([p[:start] for p in prompts], device=self.device), cache)
        new, texts = [[] for _ in prompts], [None] * len(prompts)
        for pos in range(start, max(map(len, prompts)) + max_new_tokens):
            choice = next_tokens(logits, GREEDY).tolist()
            step = [p[pos] if pos < len(p) else choice[i] for i, p in enumerate(prompts)]
            for i, p in enumerate(prompts):
                if pos >= len(p) and texts[i] is None:
                    texts[i] = self.extend(new[i], choice[i], max_new_tokens, stop)
            if all(t is not None for t in texts):
                break
            with self.autocast:
                logits = self.last_logits(torch.tensor(step, device=self.device)[:, None], cache)
        return texts

    def extend(self, ids, token, max_new_tokens, stop):
        """Append a generated token; the finished text once it hits EOT, a stop string or the budget, else None."""
        if token == self.tok.eot:
            return self.tok.decode(ids)
        ids.append(token)
        text = self.tok.decode(ids)
        cut = first_stop(text, stop)
        if cut >= 0:
            return text[:cut]
        return text if len(ids) == max_new_tokens else None


def load_scorer(out_dir, device="auto", dtype="auto", attn_impl="auto", compile=False, batch_size=16,
                shared_prefix=True):
    """(Scorer, checkpoint dict) for the checkpoint in out_dir (ckpt.pt or a sharded run's newest step_N/). Bad
    settings or a missing / unreadable checkpoint raise ValueError, FileNotFoundError or RuntimeError with a
    one-line message."""
    dev = resolve_device(device)
    dev_type = device_type(dev)
    autocast = autocast_for(dev_type, resolve_dtype(dtype, dev_type)[1])
    model, tok, ckpt = load_model(out_dir, dev, resolve_attn_impl(attn_impl))
    if compile:
        model = torch.compile(model, dynamic=True)  # lengths vary from batch to batch
    return Scorer(model, tok, dev, autocast, batch_size, shared_prefix), ckpt
