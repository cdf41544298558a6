"""One sampler for every caller (sample.py, chat.py, the evaluations' generation, the server): temperature, top-k,
top-p, min-p, repetition / frequency / presence penalties, stop strings, max tokens and a per-request seed.

    params = SamplingParams(temperature=0.7, top_p=0.9, stop=("\\n\\n",), seed=1)
    params.check()                                    # ValueError with one line for a bad value
    token = next_tokens(logits, params, generated=[ids_so_far], generators=params.generator(device))
    model.generate_tokens(idx, n, sample=sampler(params, rows=idx.size(0), device=idx.device))
    stream = TextStream(tokenizer, params.stop)       # incremental decoding that holds back a partial stop string

Order of operations, per row (the common practice of vLLM and Hugging Face):
  1. penalties on the raw logits: the repetition penalty (CTRL, Keskar et al. 2019: a seen token's logit is divided
     by it when positive, multiplied when negative), then the OpenAI frequency and presence penalties
     (logit -= frequency * count + presence * [count > 0]). They act on the model's own scores, before any rescaling,
     so a penalty means the same at every temperature.
  2. temperature 0: greedy (the argmax of the penalised logits, lowest id on ties); nothing below applies.
  3. temperature: logits / T. The filters come after it because they are defined on the distribution that is
     actually sampled (top-p's nucleus and min-p's threshold depend on its shape).
  4. top-k: keep the tokens whose logit is >= the k-th largest (ties at the k-th value are all kept, so the result
     does not depend on how a sort orders equal values).
  5. top-p (nucleus, Holtzman et al. 2019): keep the smallest most-probable set whose mass reaches top_p, plus every
     token as probable as its least probable member (ties again kept).
  6. min-p (Nguyen et al. 2024): keep the tokens with probability >= min_p * the top probability.
  Each filter sees the distribution renormalised after the one before; the most probable token always survives.

The penalties look at the ids given in `generated` (callers pass the tokens generated so far, as OpenAI and vLLM
count them for frequency and presence; the prompt is not penalised). A row whose logits are all -inf or hold a NaN
has nothing to sample: next_tokens raises ValueError naming the row. Each row is drawn with its own generator (or the
global RNG when it has none), so a seeded request draws the same tokens alone or batched with others.
"""
import math
from dataclasses import dataclass, fields

import torch

# OpenAI's accepted range for the frequency and presence penalties
PENALTY_RANGE = 2.0


@dataclass
class SamplingParams:
    temperature: float = 1.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1.0 = off
    min_p: float = 0.0                # 0.0 = off
    repetition_penalty: float = 1.0   # 1.0 = off; > 1 discourages seen tokens
    frequency_penalty: float = 0.0    # in [-2, 2]; per occurrence
    presence_penalty: float = 0.0     # in [-2, 2]; once per seen token
    max_tokens: int = 256             # tokens generated at most
    stop: tuple = ()                  # strings that end the text (not included in it)
    seed: int | None = None           # a per-request RNG; None = the global one

    def __post_init__(self):
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def check(self):
        """Raise ValueError with one line naming the first bad value; return self."""
        def require(ok, message):
            if not ok:
                raise ValueError(f"sampling: {message}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("stop", "seed"):
                continue
            require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                    f"{f.name} must be a finite number, got {value!r}")
        require(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        require(self.top_k >= 0 and int(self.top_k) == self.top_k,
                f"top_k must be a whole number >= 0 (0 = off), got {self.top_k}")
        require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        require(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        require(self.repetition_penalty > 0, f"repetition_penalty must be > 0 (1 = off), got "
                                             f"{self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            require(abs(getattr(self, name)) <= PENALTY_RANGE,
                    f"{name} must be in [-2, 2], got {getattr(self, name)}")
        require(self.max_tokens >= 1 and int(self.max_tokens) == self.max_tokens,
                f"max_tokens must be a whole number >= 1, got {self.max_tokens}")
        require(all(isinstance(s, str) and s for s in self.stop),
                f"stop must be non-empty strings, got {self.stop!r}")
        require(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)),
                f"seed must be a whole number or None, got {self.seed!r}")
        return self

    def generator(self, device="cpu"):
        """A torch.Generator seeded with `seed` on device, or None (the global RNG) without a seed."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def params_from_settings(settings, max_tokens):
    """Checked SamplingParams from a command's settings (a dict holding some of its field names; stop '' = none).
    The command's seed stays out: it seeds the global RNG, as one seed per row would make every row alike."""
    chosen = {f.name: settings[f.name] for f in fields(SamplingParams) if f.name in settings and f.name != "seed"}
    chosen["stop"] = chosen.get("stop") or ()
    return SamplingParams(**chosen, max_tokens=max_tokens).check()


def per_row(value, rows, name):
    """One value for every row, or a list with one per row."""
    if isinstance(value, (list, tuple)):
        if len(value) != rows:
            raise ValueError(f"{name}: {len(value)} given for {rows} rows")
        return list(value)
    return [value] * rows


# ------------------------------------------------------------------------------------------------ the distribution

def apply_penalties(logits, params, generated):
    """The repetition, frequency and presence penalties on raw logits (B, V), from the ids in generated (a list per
    row, or None)."""
    active = [i for i, p in enumerate(params) if generated is not None and generated[i] and (
        p.repetition_penalty != 1 or p.frequency_penalty or p.presence_penalty)]
    if not active:
        return logits
    logits = logits.clone()
    for i in active:
        ids = torch.as_tensor(generated[i], dtype=torch.long, device=logits.device)
        counts = torch.bincount(ids, minlength=logits.size(1))[:logits.size(1)].to(logits.dtype)
        seen, p, row = counts > 0, params[i], logits[i]
        if p.repetition_penalty != 1:
            penalised = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            row = torch.where(seen, penalised, row)
        logits[i] = row - p.frequency_penalty * counts - p.presence_penalty * seen.to(logits.dtype)
    return logits


def column(params, name, like):
    return torch.tensor([getattr(p, name) for p in params], dtype=like.dtype, device=like.device)[:, None]


def filtered_logits(logits, params):
    """Temperature, then top-k, top-p and min-p on penalised logits (B, V) of rows with temperature > 0: the logits
    of the distribution sampled from (-inf where a token is filtered out)."""
    V = logits.size(1)
    # max first and a temperature no smaller than the dtype can hold: a vanishing temperature tends to greedy
    temperature = column(params, "temperature", logits).clamp(min=torch.finfo(logits.dtype).tiny)
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if any(p.top_k for p in params):
        k = torch.tensor([min(p.top_k, V) or V for p in params], device=logits.device)
        kth = logits.sort(-1, descending=True).values.gather(1, k[:, None] - 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if any(p.top_p < 1 for p in params):
        probs = logits.softmax(-1)
        sorted_probs = probs.sort(-1, descending=True).values
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        keep = (mass_before < column(params, "top_p", logits)) | (column(params, "top_p", logits) >= 1)
        least_kept = sorted_probs.masked_fill(~keep, float("inf")).amin(-1, keepdim=True)
        logits = logits.masked_fill(probs < least_kept, float("-inf"))
    if any(p.min_p > 0 for p in params):
        probs = logits.softmax(-1)
        floor = column(params, "min_p", logits) * probs.amax(-1, keepdim=True)
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def check_rows(logits):
    nothing = ~(logits > float("-inf")).any(-1) | logits.isnan().any(-1)
    if nothing.any():
        rows = nothing.nonzero()[:, 0].tolist()
        raise ValueError(f"sampling: row(s) {rows} have no finite logit to sample from (all -inf or NaN)")


def distribution(logits, params, generated=None):
    """The probabilities (B, V) next_tokens draws from: one-hot on the argmax for greedy rows."""
    B = logits.size(0)
    params = per_row(params, B, "params")
    logits = apply_penalties(logits.to(torch.promote_types(logits.dtype, torch.float32)), params, generated)
    check_rows(logits)
    probs = torch.zeros_like(logits)
    greedy = [i for i, p in enumerate(params) if p.temperature == 0]
    sampled = [i for i, p in enumerate(params) if p.temperature != 0]
    if greedy:
        probs[greedy] = probs[greedy].scatter(1, logits[greedy].argmax(-1, keepdim=True), 1.0)
    if sampled:
        probs[sampled] = filtered_logits(logits[sampled], [params[i] for i in sampled]).softmax(-1)
    return probs


def next_tokens(logits, params, generated=None, generators=None):
    """The next token of each row (B,) from last-position logits (B, V). params: one SamplingParams for all rows or
    one per row; generated: per row, the ids the penalties count (or None); generators: one torch.Generator (or None
    = the global RNG) for all rows, or one per row."""
    B = logits.size(0)
    params = per_row(params, B, "params")
    generators = per_row(generators, B, "generators")
    probs = distribution(logits, params, generated)
    tokens = torch.empty(B, dtype=torch.long, device=logits.device)
    for i, p in enumerate(params):
        if p.temperature == 0:
            tokens[i] = probs[i].argmax()
        else:  # one draw per row from its own generator: batching never changes a seeded request's tokens
            tokens[i] = torch.multinomial(probs[i], 1, generator=generators[i])[0]
    return tokens


def sampler(params, rows=1, device="cpu", generators=None):
    """The `sample` function model.generate_tokens takes, (logits (B, V), each row's ids so far) -> (B,) tokens, for
    params (one SamplingParams or one per row). generators: as next_tokens'; default: each row's params.seed (None,
    the global RNG, for a row without one)."""
    if generators is None:
        generators = [p.generator(device) for p in per_row(params, rows, "params")]
    return lambda logits, generated: next_tokens(logits, params, generated, generators)


# ---------------------------------------------------------------------------------------------------- stop strings

def first_stop(text, stop):
    """Where text is cut for the stop strings, or -1: before the stop string that is completed first as the text
    grows (the longest of those completed at once), so how the text was split into pieces never matters."""
    found = [(i + len(s), i) for i, s in ((text.find(s), s) for s in stop) if i >= 0]
    return min(found)[1] if found else -1


class StopChecker:
    """Stop strings on text that arrives in pieces. feed(piece) -> (text safe to show, stopped): the text before the
    first stop string once one appears, and meanwhile everything except a tail that could still grow into a stop
    string; flush() gives that held-back tail when the text ends without one."""

    def __init__(self, stop):
        self.stop = tuple(s for s in stop if s)
        self.held = ""
        self.stopped = False

    def feed(self, piece):
        if self.stopped:
            return "", True
        text = self.held + piece
        cut = first_stop(text, self.stop)
        if cut >= 0:
            self.held, self.stopped = "", True
            return text[:cut], True
        # the longest tail of text that is a proper prefix of some stop string
        hold = max((n for s in self.stop for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)
        self.held = text[len(text) - hold:]
        return text[:len(text) - hold], False

    def flush(self):
        text, self.held = self.held, ""
        return text


class TextStream:
    """Token ids in, text out: push(id) -> (new text to show, stopped). Decodes the ids so far (a character split
    across byte-level tokens waits for its last bytes) and holds back a possible partial stop string; finish()
    returns what is still held when generation ends for another reason."""

    def __init__(self, tokenizer, stop=()):
        self.tokenizer, self.ids, self.decoded = tokenizer, [], 0
        self.checker = StopChecker(stop)

    def push(self, token):
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the next token
            return "", False
        piece, self.decoded = text[self.decoded:], len(text)
        return self.checker.feed(piece)

    def finish(self):
        text = self.tokenizer.decode(self.ids)
        tail = "" if self.checker.stopped else text[self.decoded:]
        self.decoded = len(text)
        emitted, _ = self.checker.feed(tail) if tail else ("", False)
        return emitted + ("" if self.checker.stopped else self.checker.flush())
