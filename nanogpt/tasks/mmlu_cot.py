"""MMLU with chain of thought: zero-shot, the model reasons "step by step" and its answer letter is read from what
it writes.

Protocol (lm-evaluation-harness's mmlu_flan_cot_zeroshot): the validation split (1,531 questions; mmlu_split=test
for the 14,042 of the test split), eval_mmlu.py's header (lm_eval form), then
"Q: {question}\n(A) {A} (B) {B} (C) {C} (D) {D}\nA: Let's think step by step."; greedy generation until "Q:",
"</s>" or "<|im_end|>". Strict: the text after "answer is " (or "The answer: ", "The final answer: ") up to the
line's last character, punctuation removed, must be the letter; flexible: the output's last "(X)" (the harness's
flexible-extract also accepts a choice's text: not reproduced). Questions where no letter A-D can be read are
counted as extraction failures (failed_strict, failed_flexible), apart from wrong letters. --limit takes the
subjects in turn, so a short run covers many. Files: the MMLU release, as for eval_mmlu.py (folder "mmlu").
"""
import os
import re
import string
from dataclasses import dataclass

import torch

from nanogpt.tasks import mmlu
from nanogpt.tasks.common import Generation

STOP = ("</s>", "Q:", "<|im_end|>")
STRICT = re.compile(r"(?<=answer is )(.*)(?=.)|(?<=The answer: )(.*)(?=.)|(?<=The final answer: )(.*)(?=.)")
FLEXIBLE = re.compile(r"\(([A-Da-d])\)")
NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


@dataclass
class Problem:
    id: str
    subject: str
    row: list


def read_questions(settings, k):
    """(problems, no shots): every subject's questions of the split, interleaved subject by subject."""
    root = mmlu.data_root(settings.data_dir) if settings.data_dir else \
        mmlu.fetch_release(mmlu.RELEASE_URL, os.path.join(settings.cache_dir, "mmlu"))
    split = settings.mmlu_split
    by_subject = [[Problem(f"{s}/{split}/{i}", s, row)
                   for i, row in enumerate(mmlu.read_rows(os.path.join(root, split, f"{s}_{split}.csv")))]
                  for s in mmlu.pick_subjects("", mmlu.split_subjects(root, split), split)]
    if not by_subject:
        raise FileNotFoundError(f"no {split} CSVs in {os.path.join(root, split)}")
    if not any(by_subject):
        raise ValueError(f"the {split} CSVs in {os.path.join(root, split)} hold no questions: empty files")
    longest = max(map(len, by_subject))
    return [problems[i] for i in range(longest) for problems in by_subject if i < len(problems)], []


def prompt(problem, shots):
    q, a, b, c, d, _ = problem.row
    return (mmlu.header_text(problem.subject) +
            f"Q: {q.strip()}\n(A) {a} (B) {b} (C) {c} (D) {d}\nA: Let's think step by step.")


def letter(text):
    """The answer letter a piece of output names, or None."""
    text = text.strip().translate(NO_PUNCTUATION).upper()
    return text if text in mmlu.LETTERS else None


def grade(output, problem):
    strict = STRICT.search(output)
    flexible = FLEXIBLE.findall(output)
    strict = letter(strict.group(0)) if strict else None
    flexible = flexible[-1].upper() if flexible else None
    gold = problem.row[5]
    return {"gold": gold, "strict": strict, "flexible": flexible, "acc_strict": int(strict == gold),
            "acc_flexible": int(flexible == gold), "failed_strict": int(strict is None),
            "failed_flexible": int(flexible is None)}


class WithMacroF1(Generation):
    """The generation task, with macro-F1 over the four letters beside each accuracy (mmlu.macro_f1; an answer not
    read counts as a miss of its gold letter)."""

    def run(self, scorer, settings):
        result = super().run(scorer, settings)
        index = {ch: i for i, ch in enumerate(mmlu.LETTERS)}
        for way in ("strict", "flexible"):
            gold = torch.tensor([index[r["gold"]] for r in result["records"]])
            pred = torch.tensor([index.get(r[way], -1) for r in result["records"]])
            result["metrics"][f"macro_f1_{way}"] = mmlu.macro_f1(pred, gold) if len(gold) else None
            result["stderr"][f"macro_f1_{way}"] = None
        return result


TASK = WithMacroF1("mmlu_cot", read_questions, num_fewshot=0, prompt=prompt, stop=STOP, grade=grade,
                   metrics=("acc_strict", "acc_flexible", "failed_strict", "failed_flexible"))
