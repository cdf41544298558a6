"""GSM8K (grade-school math word problems, Cobbe et al. 2021) as conversations for SFT: the question as the user
message, the worked answer, ending in its `#### N` line, as the assistant reply.

    python data/gsm8k/prepare.py --block_size 512                               # downloads train.jsonl, test.jsonl
    python data/gsm8k/prepare.py --input TRAIN.jsonl [TEST.jsonl] --block_size 512  # or local copies

Writes train and val (a seeded `--val_fraction` of train.jsonl) and, with test.jsonl, a test split, in the rows
of data/chat/prepare.py, and keeps train.jsonl (and test.jsonl) in the output folder, where RL reads its problems.
The answers' calculator annotations, `48/2 = <<48/2=24>>24`, are removed by default (`48/2 = 24`): they are the
paper's calculator calls, which only help a sampler that runs them, and chat.py does not, so the model would learn to
write every result twice. `--calculator keep` keeps them (to train for such a tool).
"""
import os
import re
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
from data.chat.prepare import check_args, parser_for, split_val, write_dataset  # noqa: E402
from nanogpt.download import download_file, run_main  # noqa: E402
from nanogpt.files import numbered_jsonl  # noqa: E402

BASE_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data"
FILES = ("train.jsonl", "test.jsonl")
ANNOTATION = re.compile(r"<<[^<>]*>>")
FINAL_LINE = re.compile(r"#### \S.*")


def conversation(record, calculator="strip"):
    """The messages of one GSM8K record {"question", "answer"}; a ValueError unless it is one."""
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("question", "answer")):
        raise ValueError('expected {"question": "...", "answer": "..."}')
    answer = record["answer"].strip()
    if not FINAL_LINE.fullmatch(answer.splitlines()[-1] if answer else ""):
        raise ValueError("the answer does not end with a '#### <number>' line")
    if calculator == "strip":
        answer = ANNOTATION.sub("", answer)
    return [{"role": "user", "content": record["question"].strip()}, {"role": "assistant", "content": answer}]


def read_problems(path, calculator="strip"):
    """The conversations of a GSM8K JSONL file; a ValueError naming file:line for a record that is not GSM8K's."""
    problems = []
    for number, record in numbered_jsonl(path):
        try:
            problems.append(conversation(record, calculator))
        except ValueError as e:
            raise ValueError(f"{path}:{number}: {e}") from None
    if not problems:
        raise ValueError(f"{path} holds no problems: an empty file")
    return problems


def check_file(path):
    """A downloaded file counts when its first record is a GSM8K problem (an HTML error page is not)."""
    conversation(next(numbered_jsonl(path), (0, None))[1])


def input_files(args):
    """The train (and test) JSONL paths: --input, or the canonical files downloaded into out_dir."""
    if args.input:
        return args.input
    return [download_file(f"{args.base_url.rstrip('/')}/{name}", os.path.join(args.out_dir, name),
                          validate=check_file, desc=f"gsm8k {name}") for name in FILES]


def main(argv=None):
    parser = parser_for(__doc__, HERE)
    parser.add_argument("--input", nargs="+", metavar="JSONL", help="local TRAIN.jsonl [TEST.jsonl], not downloaded")
    parser.add_argument("--base_url", default=BASE_URL, help="where train.jsonl and test.jsonl are downloaded from")
    parser.add_argument("--calculator", choices=("strip", "keep"), default="strip",
                        help="the <<a*b=c>> calculator annotations of the answers")
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.input and len(args.input) > 2:
        parser.error("--input takes TRAIN.jsonl and optionally TEST.jsonl")
    paths = input_files(args)
    try:
        problems = [read_problems(path, args.calculator) for path in paths]
    except ValueError as e:
        sys.exit(f"error: {e}")
    splits = dict(zip(("train", "val"), split_val(problems[0], args.val_fraction, args.seed)))
    if len(problems) > 1:
        splits["test"] = problems[1]
    written = write_dataset(args.out_dir, "conversations", splits, args.block_size, args.open_rows)
    for path, name in zip(paths, FILES):  # RL reads its prompts and answers there (nanogpt/rl.py task_problems)
        target = os.path.join(args.out_dir, name)
        if not (os.path.exists(target) and os.path.samefile(path, target)):
            shutil.copyfile(path, target)
    return written


if __name__ == "__main__":
    run_main(main)
