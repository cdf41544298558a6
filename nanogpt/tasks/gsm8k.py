"""GSM8K (Cobbe et al., 2021): grade-school math word problems, answered by greedy generation.

Protocol (lm-evaluation-harness's gsm8k): the test split (1,319 problems), 5 shots drawn from the train split, each
"Question: {question}\nAnswer: {answer}" with the worked answer as the dataset writes it (calculator annotations
<<...>> and the final "#### N" line included), then "Question: {question}\nAnswer:"; greedy generation until
"Question:", "</s>" or "<|im_end|>" (or EOT, or max_new_tokens). Exact match against the number after the
reference's "#### ", both sides with commas and "$" removed, a final "." dropped and lower-cased: strict reads the
number after the output's first "#### ", flexible the output's last number ("[invalid]" when there is none).
Files: train.jsonl and test.jsonl of OpenAI's grade-school-math repository (one JSON object a line: question,
answer).
"""
import re
from dataclasses import dataclass

from nanogpt.tasks.common import Files, Generation, read_task_rows

BASE_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data"
FILES = Files("gsm8k", {name: f"{BASE_URL}/{name}" for name in ("train.jsonl", "test.jsonl")})
STOP = ("Question:", "</s>", "<|im_end|>")
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORED = (",", r"\$", r"(?s).*#### ", r"\.$")  # removed from both sides, in this order, before comparing


@dataclass
class Problem:
    id: str
    question: str
    answer: str


def to_pair(row):
    if not isinstance(row["question"], str) or "#### " not in row["answer"]:
        raise ValueError("expected a question and an answer ending in '#### <number>'")
    return row["question"], row["answer"]


def read_questions(settings, k):
    """(test problems, train problems as shots)."""
    def problems(name):
        return [Problem(f"{name.removesuffix('.jsonl')}/{i}", *pair)
                for i, pair in enumerate(read_task_rows(FILES, name, to_pair, settings))]
    return problems("test.jsonl"), problems("train.jsonl") if k else []


def prompt(problem, shots):
    return "".join(f"Question: {s.question}\nAnswer: {s.answer}\n\n" for s in shots) + \
        f"Question: {problem.question}\nAnswer:"


def normalize(text):
    for pattern in IGNORED:
        text = re.sub(pattern, "", text)
    return text.lower()


def extract(output):
    """(strict, flexible) answers read from a generated output, '[invalid]' where there is none."""
    strict = STRICT.findall(output)
    flexible = FLEXIBLE.findall(output)
    last = next((g for g in flexible[-1] if g), "") if flexible else ""
    return (strict[0].strip() if strict else "[invalid]"), (last.strip() or "[invalid]")


def grade(output, problem):
    strict, flexible = extract(output)
    target = normalize(problem.answer)
    return {"target": target, "strict": strict, "flexible": flexible,
            "exact_match_strict": int(normalize(strict) == target),
            "exact_match_flexible": int(normalize(flexible) == target)}


TASK = Generation("gsm8k", read_questions, num_fewshot=5, prompt=prompt, stop=STOP, grade=grade,
                  metrics=("exact_match_strict", "exact_match_flexible"))
