"""lm-evaluation-harness adapter: a checkpoint of this repo (any architecture: hybrid attention, KV sharing, MoE) as
the lm-eval model "nanogpt", scored by nanogpt/scoring.py. lm-eval is optional (`pip install lm-eval==0.4.13`).

    python tools/lm_eval_adapter.py --model nanogpt --model_args out_dir=out --tasks hellaswag,arc_easy --batch_size 16

takes lm-eval's own command line (`lm_eval --help`): it registers "nanogpt", then runs lm-eval's CLI, so this is
`lm_eval --model nanogpt ...` for a model lm-eval cannot import by itself. From Python, importing this module
registers it: `lm_eval.simple_evaluate(model="nanogpt", model_args="out_dir=out", tasks=[...])`.
model_args: out_dir, dtype, attn_impl, shared_prefix (True/False), max_gen_toks (default 256); the device and the
batch size are lm-eval's --device (its default cuda:0 falls back to the CPU without a GPU, as its own models do) and
--batch_size ("auto" means 16).

Requests are scored the harness's way (TemplateLM's context/continuation split, its rolling windows, generation cut
at the `until` strings) on our batching: loglikelihood groups the requests of one context, so a multiple-choice
question's shots and context are computed once. Generation is greedy only.
"""
import os
import sys

import torch
from tqdm import tqdm

NEEDS_LM_EVAL = "tools/lm_eval_adapter.py needs lm-evaluation-harness: pip install lm-eval==0.4.13"
try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ModuleNotFoundError as e:
    if e.name != "lm_eval" and not (e.name or "").startswith("lm_eval."):
        raise
    if __name__ == "__main__":
        sys.exit(NEEDS_LM_EVAL)
    raise ModuleNotFoundError(NEEDS_LM_EVAL, name="lm_eval") from None

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from nanogpt.scoring import load_scorer, rolling_windows  # noqa: E402


def flag(value):
    """A model_args boolean: lm-eval passes True/False, or the text when it was not one of its spellings."""
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("nanogpt")
class NanoGPT(TemplateLM):
    def __init__(self, out_dir="out", device="auto", dtype="auto", attn_impl="auto", batch_size=16,
                 shared_prefix=True, max_gen_toks=256, **ignored):  # ignored: lm-eval's max_batch_size and the like
        super().__init__()
        if device.startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"
        batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.scorer, _ = load_scorer(out_dir, device, dtype, attn_impl, False, batch_size, flag(shared_prefix))
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self):
        return self.scorer.tok.eot

    @property
    def prefix_token_id(self):
        """What an empty context conditions on: EOT, or for a character vocabulary (no EOT) a newline."""
        tok = self.scorer.tok
        return tok.eot if tok.eot is not None else tok.stoi.get("\n", 0)

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return self.scorer.encode(string)

    def tok_decode(self, tokens, **kwargs):
        return self.scorer.tok.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        """[(log-likelihood, is greedy)] of ((context, continuation), context ids, continuation ids) requests."""
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        groups = [args[0] for args, _, _ in requests]  # the choices of one question share its context
        logprobs, greedy = self.scorer.loglikelihoods(pairs, groups, greedy=True, desc="loglikelihood")
        results = [(float(lp.sum()), g) for lp, g in zip(logprobs, greedy)]
        for (args, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """The log-likelihood of each whole text, summed over the harness's rolling windows."""
        windows, owner = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            for window in rolling_windows(self.tok_encode(text), self.scorer.block_size, self.prefix_token_id):
                windows.append(window)
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, lp in zip(owner, self.scorer.loglikelihoods(windows, desc="loglikelihood_rolling")):
            totals[n] += float(lp.sum())
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm=False):
        """Greedy continuations cut before the first `until` string, up to max_gen_toks tokens."""
        out = [None] * len(requests)
        by_settings = {}
        for n, req in enumerate(requests):
            kwargs = req.args[1]
            if kwargs.get("do_sample") or kwargs.get("temperature", 0) > 0:
                raise ValueError("nanogpt generates greedily only: set do_sample=False / temperature=0")
            until = kwargs.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            budget = min(int(kwargs.get("max_gen_toks", self.max_gen_toks)), self.scorer.block_size - 1)
            by_settings.setdefault((until, budget), []).append(n)
        for (until, budget), rows in tqdm(by_settings.items(), desc="generate_until", disable=disable_tqdm):
            prompts = [self.tok_encode(requests[n].args[0]) for n in rows]
            texts = self.scorer.generate(prompts, budget, until) if budget > 0 else [""] * len(rows)
            for n, text in zip(rows, texts):
                out[n] = text
                self.cache_hook.add_partial("generate_until", requests[n].args, text)
        return out


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate
    cli_evaluate()  # lm-eval's own command line, with "nanogpt" registered
