"""HellaSwag (Zellers et al., ACL 2019): pick the right ending of an ActivityNet or WikiHow context among four.

Protocol (lm-evaluation-harness's hellaswag): the validation split (10,042 questions; the test split has no
labels), 10 shots drawn from the train split, acc and acc_norm. The context is "{activity_label}: {ctx_a}
{ctx_b capitalised}" and every text goes through the harness's clean-up of the dataset's artefacts: stripped,
" [title]" becomes ". ", other bracketed tags such as "[header]" or "[step]" are removed, double spaces become one.
Files: the dataset repository's hellaswag_val.jsonl and hellaswag_train.jsonl (one JSON object a line: ind,
activity_label, ctx_a, ctx_b, ctx, endings (4), label, source_id, split, split_type).
"""
import re

from nanogpt.tasks.common import Files, MultipleChoice, Question

BASE_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data"
FILES = Files("hellaswag", {name: f"{BASE_URL}/{name}" for name in ("hellaswag_val.jsonl", "hellaswag_train.jsonl")})


def preprocess(text):
    """The harness's clean-up of WikiHow / ActivityNet artefacts."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def to_question(row):
    label = int(row["label"])
    if len(row["endings"]) != 4 or not 0 <= label < 4:
        raise ValueError(f"expected 4 endings and a label in 0..3, got {len(row['endings'])} endings, label {label}")
    context = preprocess(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    return Question(str(row["ind"]), [context], [preprocess(e) for e in row["endings"]], label)


TASK = MultipleChoice("hellaswag", FILES, "hellaswag_val.jsonl", "hellaswag_train.jsonl", to_question, num_fewshot=10)
