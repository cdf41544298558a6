"""ARC (Clark et al., 2018): grade-school science questions, the Easy and the Challenge set.

Protocol (lm-evaluation-harness's arc_easy / arc_challenge): the test split (Easy 2,376, Challenge 1,172
questions), 25 shots drawn from the train split, "Question: {stem}\nAnswer:" followed by each choice's text (3 to 5
choices; labels A-E or 1-5), acc and acc_norm.
Files: ARC-Easy-Test.jsonl, ARC-Easy-Train.jsonl, ARC-Challenge-Test.jsonl, ARC-Challenge-Train.jsonl, as in AI2's
release ARC-V1-Feb2018.zip (649 MB with its corpus; downloaded once, the four files kept). One JSON object a line:
{"id", "question": {"stem", "choices": [{"text", "label"}, ...]}, "answerKey"}.
"""
from nanogpt.tasks.common import Files, MultipleChoice, Question

ARCHIVE = "https://s3-us-west-2.amazonaws.com/ai2-website/data/ARC-V1-Feb2018.zip"
MEMBERS = {f"ARC-{subset}-{split}.jsonl": f"ARC-V1-Feb2018-2/ARC-{subset}/ARC-{subset}-{split}.jsonl"
           for subset in ("Easy", "Challenge") for split in ("Test", "Train")}
FILES = Files("arc", archive=ARCHIVE, members=MEMBERS)


def to_question(row):
    choices = row["question"]["choices"]
    labels = [c["label"] for c in choices]
    if row["answerKey"] not in labels:
        raise ValueError(f"answerKey {row['answerKey']!r} is none of the labels {labels}")
    return Question(row["id"], [f"Question: {row['question']['stem']}\nAnswer:"], [c["text"] for c in choices],
                    labels.index(row["answerKey"]))


def arc(subset):
    return MultipleChoice(f"arc_{subset.lower()}", FILES, f"ARC-{subset}-Test.jsonl", f"ARC-{subset}-Train.jsonl",
                          to_question, num_fewshot=25)


EASY, CHALLENGE = arc("Easy"), arc("Challenge")
