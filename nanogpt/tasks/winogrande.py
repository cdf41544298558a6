"""Winogrande (Sakaguchi et al., AAAI 2020): fill the blank of a sentence with one of two options.

Protocol (lm-evaluation-harness's winogrande, partial scoring): the validation split (dev.jsonl, 1,267 questions),
5 shots drawn from the XL train split, acc. The blank splits the sentence: each option fills it in the context
"{text before _}{option}", and what is scored is the same continuation for both, " {text after _, stripped}": the
option under which the rest of the sentence is likelier wins. A shot is the sentence with its right option filled in.
Files: dev.jsonl and train_xl.jsonl of AI2's winogrande_1.1.zip (one JSON object a line: qID, sentence (one _),
option1, option2, answer "1" or "2").
"""
from nanogpt.tasks.common import Files, MultipleChoice, Question

ARCHIVE = "https://storage.googleapis.com/ai2-mosaic/public/winogrande/winogrande_1.1.zip"
FILES = Files("winogrande", archive=ARCHIVE,
              members={name: f"winogrande_1.1/{name}" for name in ("dev.jsonl", "train_xl.jsonl")})


def to_question(row):
    sentence = row["sentence"]
    if "_" not in sentence or row["answer"] not in ("1", "2"):
        raise ValueError(f"expected a _ in the sentence and answer '1' or '2', got {sentence!r}, {row['answer']!r}")
    before, after = sentence.split("_", 1)  # the first blank, as the harness splits it
    options = [row["option1"], row["option2"]]
    return Question(row["qID"], [before + option for option in options], [after.strip()] * 2, int(row["answer"]) - 1)


TASK = MultipleChoice("winogrande", FILES, "dev.jsonl", "train_xl.jsonl", to_question, num_fewshot=5, metrics=("acc",))
