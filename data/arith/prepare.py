"""Arithmetic word problems: a synthetic task with a verifier, small enough for a CPU model to learn, for the whole
post-training road (pretrain -> SFT -> RL) on a 2-core machine.

    python data/arith/prepare.py                                   # 1-digit operands, families add,sub,sum3
    python data/arith/prepare.py --digits 1-2 --families add,sum3 --n_train 50000 --block_size 128

Families (each question a templated story, each answer a worked solution ending in GSM8K's `#### N` line):
    add   "Ann has 3 pens. Ann gets 5 more pens. How many pens does Ann have now?"   -> "3 + 5 = 8\\n#### 8"
    sub   "Ben has 9 coins and gives 4 away. How many coins does Ben have left?"     -> "9 - 4 = 5\\n#### 5"
    sum3  multi-step: three amounts added one step at a time              -> "3 + 5 = 8\\n8 + 2 = 10\\n#### 10"
Operands have a number of digits drawn from --digits (`1`, or a range `1-2`); `sub` never goes below zero.

Splits. Problems are drawn with a seeded generator, duplicates (the same question text) dropped, and the distinct
problems shuffled and cut into test, val and train: a question is in exactly one split, and the same --seed and
settings give the same splits. (With 1-digit operands the same sum can recur in another split under other names and
objects; the question text never does.)

Writes into --out_dir (data/arith):
    train.jsonl, val.jsonl, test.jsonl   one problem a line: {"question", "answer" (the worked solution), "family"}:
                                         the prompts and verifier targets of RL (nanogpt/rl.py) and of the eval
                                         task (nanogpt/tasks/arith.py), in GSM8K's own record format
    train/val shards + tokenizer.json    the conversations (question -> worked solution) for SFT, as
                                         data/chat/prepare.py writes them
and into --text_dir (data/arith_text) the base model's pretraining text: the train problems as plain text,
"Question: ...\\nAnswer: ...\\n\\n", GPT-2 BPE without chat tokens (val: the val problems). Test problems appear
nowhere but test.jsonl.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
import numpy as np  # noqa: E402

from data.chat.prepare import parser_for, write_dataset  # noqa: E402
from nanogpt.download import run_main  # noqa: E402
from nanogpt.files import write_atomic  # noqa: E402
from nanogpt.shards import ShardWriter, check_out_dir, clear_dataset  # noqa: E402
from nanogpt.tokenizer import Tokenizer, save_dataset_spec  # noqa: E402

FAMILIES = ("add", "sub", "sum3")
NAMES = ("Ann", "Ben", "Cal", "Dee", "Eva", "Finn", "Gus", "Hana", "Ivy", "Jon", "Kim", "Leo")
ITEMS = ("apples", "pens", "books", "coins", "cards", "shells", "stamps", "marbles", "eggs", "cups")


def parse_digits(text):
    """(low, high) digit counts from '1' or '1-2'; a ValueError otherwise."""
    try:
        low, _, high = text.partition("-")
        low, high = int(low), int(high or low)
    except ValueError:
        raise ValueError(f"--digits must be a count like 1 or a range like 1-2, got {text!r}") from None
    if not 1 <= low <= high <= 6:
        raise ValueError(f"--digits must lie in 1..6 with low <= high, got {text!r}")
    return low, high


def operand(rng, digits):
    """A number with a digit count drawn from digits=(low, high): 0..9 for one digit, 10..99 for two, ..."""
    d = int(rng.integers(digits[0], digits[1] + 1))
    return int(rng.integers(0 if d == 1 else 10 ** (d - 1), 10 ** d))


def problem(rng, family, digits):
    """One problem {"question", "answer", "family"}: a story and its worked solution ending in '#### N'."""
    name, item = NAMES[rng.integers(len(NAMES))], ITEMS[rng.integers(len(ITEMS))]
    a, b = operand(rng, digits), operand(rng, digits)
    if family == "add":
        question = f"{name} has {a} {item}. {name} gets {b} more {item}. How many {item} does {name} have now?"
        steps, result = [f"{a} + {b} = {a + b}"], a + b
    elif family == "sub":
        a, b = max(a, b), min(a, b)
        question = f"{name} has {a} {item} and gives {b} away. How many {item} does {name} have left?"
        steps, result = [f"{a} - {b} = {a - b}"], a - b
    elif family == "sum3":
        c = operand(rng, digits)
        question = (f"{name} has {a} {item}, finds {b} more and then buys {c} more. "
                    f"How many {item} does {name} have?")
        steps, result = [f"{a} + {b} = {a + b}", f"{a + b} + {c} = {a + b + c}"], a + b + c
    else:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    return {"question": question, "answer": "\n".join(steps) + f"\n#### {result}", "family": family}


def make_splits(families, digits, sizes, seed):
    """{split: problems} for sizes {"test": n, "val": n, "train": n}: distinct questions drawn with `seed` (families
    in turn), shuffled, then cut in that order; a ValueError when the settings allow fewer distinct questions."""
    rng, wanted = np.random.default_rng(seed), sum(sizes.values())
    seen, problems = set(), []
    for attempt in range(20 * wanted):
        if len(problems) == wanted:
            break
        p = problem(rng, families[attempt % len(families)], digits)
        if p["question"] not in seen:
            seen.add(p["question"])
            problems.append(p)
    if len(problems) < wanted:
        raise ValueError(f"only {len(problems):,} distinct questions found for {wanted:,}: ask for fewer problems or "
                         "more digits")
    order = np.random.default_rng(seed + 1).permutation(len(problems))
    splits, start = {}, 0
    for split, n in sizes.items():
        splits[split] = [problems[i] for i in order[start:start + n]]
        start += n
    return splits


def plain_text(p):
    """A problem as pretraining text (no chat tokens)."""
    return f"Question: {p['question']}\nAnswer: {p['answer']}\n\n"


def write_text(text_dir, splits):
    """The pretraining text: train and val problems as plain GPT-2 BPE documents, each opened by <|endoftext|>."""
    tokenizer = Tokenizer({"kind": "gpt2"})
    for split in ("train", "val"):
        writer = ShardWriter(text_dir, split, vocab_size=tokenizer.vocab_size)
        for p in splits[split]:
            writer.add([tokenizer.eot] + tokenizer.encode_ordinary(plain_text(p)))
        writer.close()
    save_dataset_spec(text_dir, tokenizer.spec)


def conversation(p):
    return [{"role": "user", "content": p["question"]}, {"role": "assistant", "content": p["answer"]}]


def main(argv=None):
    parser = parser_for(__doc__, HERE)
    parser.set_defaults(block_size=128)
    parser.add_argument("--text_dir", default=os.path.join(HERE, "..", "arith_text"),
                        help="where the base model's pretraining text goes")
    parser.add_argument("--digits", default="1", help="digits of each operand: a count (1) or a range (1-2)")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma list of {', '.join(FAMILIES)}")
    parser.add_argument("--n_train", type=int, default=20000, help="train problems (SFT, RL prompts, pretraining)")
    parser.add_argument("--n_val", type=int, default=200, help="val problems (evaluations during training)")
    parser.add_argument("--n_test", type=int, default=500, help="held-out test problems (the reported numbers)")
    args = parser.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if not families or unknown:
        parser.error(f"--families: unknown {unknown or [args.families]}; choose from {', '.join(FAMILIES)}")
    if min(args.n_train, args.n_val, args.n_test) < 1 or args.block_size < 1:
        parser.error("--n_train, --n_val, --n_test and --block_size must be >= 1")
    try:
        digits = parse_digits(args.digits)
        for folder in (args.out_dir, args.text_dir):
            check_out_dir(folder, args.overwrite)
        splits = make_splits(families, digits, {"test": args.n_test, "val": args.n_val, "train": args.n_train},
                             args.seed)
    except (ValueError, FileExistsError) as e:
        parser.error(str(e))
    info = write_dataset(args.out_dir, "conversations", {s: [conversation(p) for p in splits[s]]
                                                         for s in ("train", "val")}, args.block_size, args.open_rows)
    for split, problems in splits.items():
        write_atomic(os.path.join(args.out_dir, f"{split}.jsonl"), "".join(json.dumps(p) + "\n" for p in problems))
    os.makedirs(args.text_dir, exist_ok=True)
    clear_dataset(args.text_dir)
    write_text(args.text_dir, splits)
    print(f"wrote {', '.join(f'{len(v):,} {k}' for k, v in splits.items())} problems ({', '.join(families)}; "
          f"digits {args.digits}) to {args.out_dir}, pretraining text to {args.text_dir}")
    return info


if __name__ == "__main__":
    run_main(main)
