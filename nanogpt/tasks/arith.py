"""Arithmetic word problems (data/arith/prepare.py), or any JSONL of {"question", "answer" ending in '#### N'} such
as GSM8K's test.jsonl: pass@1 and pass@k by sampling, and greedy accuracy, on the held-out test split.

Protocol. A chat model (its tokenizer has the chat tokens) gets the question as one user turn and
<|assistant_start|>, and its reply ends at <|assistant_end|>; a base model gets "Question: {question}\\nAnswer:" (the
form of data/arith_text's pretraining text) and its reply ends at <|endoftext|>. Either way at most max_new_tokens.
SAMPLES completions at temperature 1 from the TOP_K likeliest tokens (config/rl_arith.py's sampler) give pass@1 and
pass@SAMPLES (the unbiased estimator of Chen et al. 2021); one greedy completion gives `greedy`. A reply is correct
when its last '#### N' number equals the reference's (nanogpt/rl.py's verifier). Files: test.jsonl in data_dir
(default data/arith), or data_dir/arith/test.jsonl. Sampling is seeded (fewshot_seed): a rerun gives the same numbers.
"""
import os
import time

import torch

from nanogpt.chat_format import chat_tokens
from nanogpt.rl import pass_at_k, prompt_ids, read_problems, solve_rates
from nanogpt.tasks.common import find_local, task_result

SAMPLES = 8
TEMPERATURE = 1.0
TOP_K = 20
DEFAULT_DIR = "data/arith"


def has_chat(tokenizer):
    try:
        chat_tokens(tokenizer)
        return True
    except ValueError:
        return False


def prompts_and_stop(tokenizer, problems):
    """(prompt ids, the stop id): the chat prompt for a chat model, the pretraining text's form for a base model."""
    if has_chat(tokenizer):
        return [prompt_ids(tokenizer, p["question"]) for p in problems], chat_tokens(tokenizer)["assistant"][1]
    if tokenizer.eot is None:
        raise ValueError("the arith task needs a GPT-2 BPE model (a character-level model has no <|endoftext|>)")
    return [[tokenizer.eot] + tokenizer.encode_ordinary(f"Question: {p['question']}\nAnswer:") for p in problems], \
        tokenizer.eot


class ArithTask:
    name = "arith"

    def run(self, scorer, settings):
        start = time.time()
        problems = read_problems(find_local(settings.data_dir or DEFAULT_DIR, "arith", "test.jsonl"))
        problems = problems[:settings.limit or None]
        prompts, stop_id = prompts_and_stop(scorer.tok, problems)
        references = [p["answer"] for p in problems]
        model = scorer.model
        generator = torch.Generator(device=model.wte.weight.device)
        args = (stop_id, scorer.tok.vocab_size, scorer.tok)
        with scorer.autocast:
            generator.manual_seed(settings.fewshot_seed)
            sampled = solve_rates(model, prompts, references, SAMPLES, *args, TEMPERATURE, TOP_K,
                                  settings.max_new_tokens, generator)
            greedy = solve_rates(model, prompts, references, 1, *args, 0, None, settings.max_new_tokens, generator)
        records = [{"id": i, "family": p.get("family", ""), "correct_of_samples": c, "pass@1": pass_at_k(SAMPLES, c, 1),
                    f"pass@{SAMPLES}": pass_at_k(SAMPLES, c, SAMPLES), "greedy": float(g)}
                   for i, (p, c, g) in enumerate(zip(problems, sampled, greedy))]
        fmt = "chat" if has_chat(scorer.tok) else "plain 'Question:/Answer:' (a base model)"
        return task_result(self.name, 0, records, ("pass@1", f"pass@{SAMPLES}", "greedy"), start,
                           [f"prompt format: {fmt}; {SAMPLES} samples at temperature {TEMPERATURE}, top-k {TOP_K}"])


TASK = ArithTask()
