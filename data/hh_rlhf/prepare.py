"""Anthropic HH-RLHF (Bai et al. 2022) preference pairs for DPO, in the pair rows of data/chat/prepare.py.

    python data/hh_rlhf/prepare.py --block_size 1024                          # downloads harmless-base, helpful-base
    python data/hh_rlhf/prepare.py --subsets harmless-base --block_size 512
    python data/hh_rlhf/prepare.py --input harmless-base-test.jsonl.gz --block_size 512   # or local files

Each line of the upstream files is {"chosen": dialogue, "rejected": dialogue}, a dialogue being
"\\n\\nHuman: ...\\n\\nAssistant: ...". A dialogue is cut into turns at "\\n\\nHuman:" and "\\n\\nAssistant:"
(contents stripped; consecutive turns of one speaker, which the data has, joined by a blank line), Human -> user,
Assistant -> assistant. The prompt is every turn but the last Assistant reply, and the two sides must share it: a
line whose sides differ earlier, or that does not end with an Assistant reply, is skipped, counted and its line
numbers printed (none of harmless-base test's 2,312 lines is: its 5 whose raw sides part earlier hold a reply
split into two Assistant turns, which joining makes one). A line that is not such a record (not JSON, no
chosen/rejected, a side that does not start with a Human turn) stops with its file and line. The val split is a
seeded `--val_fraction` of all pairs.
"""
import os
import re
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
from data.chat.prepare import check_args, parser_for, split_val, write_dataset  # noqa: E402
from nanogpt.download import download_file, run_main  # noqa: E402
from nanogpt.files import numbered_jsonl  # noqa: E402

BASE_URL = "https://raw.githubusercontent.com/anthropics/hh-rlhf/master"  # + /{subset}/train.jsonl.gz
SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
TURN = re.compile(r"\n\n(Human|Assistant):")
ROLES = {"Human": "user", "Assistant": "assistant"}


class Skipped(Exception):
    """A well-formed record that makes no usable pair; the message is the reason."""


def dialogue(text):
    """The messages of one side; a ValueError unless it is a dialogue that starts with a Human turn."""
    if not isinstance(text, str) or not text.startswith("\n\nHuman:"):
        raise ValueError('each side must be a dialogue starting with "\\n\\nHuman:"')
    parts = TURN.split(text)[1:]  # speaker, content, speaker, content, ...
    messages = []
    for speaker, content in zip(parts[::2], parts[1::2]):
        if messages and messages[-1]["role"] == ROLES[speaker]:
            messages[-1]["content"] = f"{messages[-1]['content']}\n\n{content.strip()}".strip()
        else:
            messages.append({"role": ROLES[speaker], "content": content.strip()})
    return messages


def pair(record):
    """(prompt messages, chosen reply, rejected reply) of an HH record; a ValueError for a record that is not one,
    Skipped for one whose sides do not share a prompt."""
    if not isinstance(record, dict) or not {"chosen", "rejected"} <= set(record):
        raise ValueError('expected {"chosen": "...", "rejected": "..."}')
    chosen, rejected = dialogue(record["chosen"]), dialogue(record["rejected"])
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise Skipped("a side does not end with an Assistant reply")
    if chosen[:-1] != rejected[:-1]:
        raise Skipped("chosen and rejected differ before the last reply")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def read_pairs(path):
    """(pairs, {reason: skipped line numbers}) of an HH-RLHF JSONL file; a ValueError names a malformed file:line."""
    pairs, skipped = [], defaultdict(list)
    for number, record in numbered_jsonl(path):
        try:
            pairs.append(pair(record))
        except Skipped as e:
            skipped[str(e)].append(number)
        except ValueError as e:
            raise ValueError(f"{path}:{number}: {e}") from None
    return pairs, dict(skipped)


def check_file(path):
    """A downloaded file counts when its first line is an HH record (not a Git LFS pointer or an error page)."""
    with open(path, "rb") as f:
        if f.read(40).startswith(b"version https://git-lfs"):
            raise ValueError("the server sent a Git LFS pointer, not the data: use --base_url "
                             "https://media.githubusercontent.com/media/anthropics/hh-rlhf/master")
    try:
        pair(next(numbered_jsonl(path), (0, None))[1])
    except Skipped:
        pass


def input_files(args):
    """--input, or each subset's train.jsonl.gz downloaded into out_dir."""
    if args.input:
        return args.input
    return [download_file(f"{args.base_url.rstrip('/')}/{subset}/train.jsonl.gz",
                          os.path.join(args.out_dir, f"{subset}-train.jsonl.gz"), validate=check_file,
                          desc=f"hh-rlhf {subset}") for subset in args.subsets]


def main(argv=None):
    parser = parser_for(__doc__, HERE)
    parser.add_argument("--input", nargs="+", metavar="JSONL", help="local HH-RLHF files (.jsonl or .jsonl.gz)")
    parser.add_argument("--subsets", nargs="+", choices=SUBSETS, default=["harmless-base", "helpful-base"],
                        help="the train files downloaded when there is no --input")
    parser.add_argument("--base_url", default=BASE_URL, help="the hh-rlhf repository's raw files")
    args = parser.parse_args(argv)
    check_args(parser, args)
    pairs, paths = [], input_files(args)
    for path in paths:
        try:
            found, skipped = read_pairs(path)
        except ValueError as e:
            sys.exit(f"error: {e}")
        for reason, lines in skipped.items():
            shown = ", ".join(map(str, lines[:10])) + (", ..." if len(lines) > 10 else "")
            print(f"{path}: skipped {len(lines)} line(s), {reason}: line {shown}")
        pairs += found
    if not pairs:
        sys.exit(f"error: no usable pairs in {', '.join(paths)}: empty files, or every line skipped")
    train, val = split_val(pairs, args.val_fraction, args.seed)
    return write_dataset(args.out_dir, "pairs", {"train": train, "val": val}, args.block_size)


if __name__ == "__main__":
    run_main(main)
