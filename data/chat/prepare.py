"""Conversations (for SFT) or preference pairs (for DPO) from JSONL files, as rows of block_size + 1 tokens.

    python data/chat/prepare.py --input chats.jsonl [more.jsonl.gz ...] --out_dir data/mychat --block_size 1024

Every line of the inputs (plain or gzipped) holds one of two formats, the same in all lines:

    {"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}           a conversation
    {"prompt": [messages ending with a user message], "chosen": "...", "rejected": "..."}  a preference pair

Rendering is nanogpt/chat_format.py's (GPT-2 BPE + the chat tokens): loss mask 1 on assistant replies and their end
token. A seeded shuffle holds out `--val_fraction` of the items as the val split (the same items for the same inputs
and seed). The other scripts that make post-training data (data/gsm8k, data/hh_rlhf) write through this one's
functions. A folder that already holds a prepared dataset is refused unless `--overwrite` is given.

Packing. Conversations, in the shuffled order, go whole into the first of the 8 newest rows with room for them (a
new row when none has; the oldest row is then written out), rows padded at the end with <|endoftext|> (mask 0):
GSM8K's train rows are 12% padding at block_size 256, 5% at 512. A conversation longer than a row (block_size + 1
tokens) is dropped and counted, never cut. Attention crosses the conversations of a row (no document mask), as
pretraining's crosses documents: each conversation opens with <|endoftext|>, the boundary the base model learned to
read past. (Preventing it would take document ids per row and a mask of same-document pairs in every attention
layer and kernel; `--open_rows 0` writes one conversation per row instead, to measure what packing changes.)
A pair is one row: its chosen then its rejected sequence, each padded to block_size + 1 tokens; a pair with a side
longer than that is dropped and counted.
"""
import argparse
import os
import sys
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from nanogpt.chat_format import check_messages, render, render_reply  # noqa: E402
from nanogpt.download import run_main  # noqa: E402
from nanogpt.files import numbered_jsonl  # noqa: E402
from nanogpt.shards import RowWriter, check_out_dir, clear_dataset, write_rows_info  # noqa: E402
from nanogpt.tokenizer import Tokenizer, chat_spec, save_dataset_spec  # noqa: E402

FORMATS = ('{"messages": [...]} (a conversation) or {"prompt": [...], "chosen": "...", "rejected": "..."} '
           '(a preference pair)')


# ----------------------------------------------------------------------------------------------------- reading

def parse_record(record):
    """('conversations', messages) or ('pairs', (prompt, chosen, rejected)); a ValueError saying what is wrong."""
    if isinstance(record, dict) and "messages" in record:
        check_messages(record["messages"])
        if not any(m["role"] == "assistant" for m in record["messages"]):
            raise ValueError("the conversation has no assistant message: nothing to learn")
        return "conversations", record["messages"]
    if isinstance(record, dict) and {"prompt", "chosen", "rejected"} <= set(record):
        check_messages(record["prompt"])
        if record["prompt"][-1]["role"] != "user":
            raise ValueError("a pair's prompt must end with a user message")
        if not isinstance(record["chosen"], str) or not isinstance(record["rejected"], str):
            raise ValueError("chosen and rejected must be strings (the two replies)")
        return "pairs", (record["prompt"], record["chosen"], record["rejected"])
    raise ValueError(f"expected {FORMATS}")


def read_items(paths):
    """(kind, items) of the JSONL files: all conversations or all pairs; a ValueError naming file:line otherwise."""
    kind, items = None, []
    for path in paths:
        for number, record in numbered_jsonl(path):
            try:
                record_kind, item = parse_record(record)
            except ValueError as e:
                raise ValueError(f"{path}:{number}: {e}") from None
            if kind not in (None, record_kind):
                raise ValueError(f"{path}:{number}: a {record_kind[:-1]} among {kind}: one kind per dataset")
            kind = record_kind
            items.append(item)
    if kind is None:
        raise ValueError(f"no records in {', '.join(paths)}")
    return kind, items


# ----------------------------------------------------------------------------------------------------- rows

def split_val(items, fraction, seed):
    """(train, val) in a seeded shuffled order: the first round(fraction * n) items of it (at least one when
    fraction > 0) are val."""
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = min(len(items), max(1, round(fraction * len(items)))) if fraction > 0 else 0
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]


def padded(ids, mask, row_tokens, pad_id):
    return ids + [pad_id] * (row_tokens - len(ids)), mask + [0] * (row_tokens - len(mask))


def finish_row(ids, mask, row_tokens, pad_id, stats):
    stats["padding"] += row_tokens - len(ids)
    return padded(ids, mask, row_tokens, pad_id)


def pack(samples, row_tokens, pad_id, stats, open_rows=8):
    """Rows (ids, mask) of row_tokens holding whole (ids, mask) samples, padded with pad_id (mask 0). First fit:
    each sample goes into the first of the `open_rows` newest rows with room, or a new row (then the oldest is
    written out); open_rows=0 gives each sample a row of its own. A sample longer than a row is dropped: stats
    counts 'dropped' and the 'padding' tokens."""
    rows = []
    for ids, mask in samples:
        if len(ids) > row_tokens:
            stats["dropped"] += 1
            continue
        row = next((r for r in rows if len(r[0]) + len(ids) <= row_tokens), None)
        if row is None:
            row = ([], [])
            rows.append(row)
        row[0].extend(ids)
        row[1].extend(mask)
        if len(rows) > open_rows:
            yield finish_row(*rows.pop(0), row_tokens, pad_id, stats)
    for row in rows:
        yield finish_row(*row, row_tokens, pad_id, stats)


def pair_rows(sides, row_tokens, pad_id, stats):
    """Rows of 2 * row_tokens: the chosen (ids, mask), then the rejected, each padded; a pair with a side longer
    than row_tokens is dropped (counted in stats)."""
    for chosen, rejected in sides:
        if max(len(chosen[0]), len(rejected[0])) > row_tokens:
            stats["dropped"] += 1
            continue
        (c_ids, c_mask), (r_ids, r_mask) = padded(*chosen, row_tokens, pad_id), padded(*rejected, row_tokens, pad_id)
        stats["padding"] += 2 * row_tokens - len(chosen[0]) - len(rejected[0])
        yield c_ids + r_ids, c_mask + r_mask


def rows_of(kind, tokenizer, items, row_tokens, open_rows, stats, desc):
    """The rows of one split's items, rendered with a progress bar."""
    items = tqdm(items, desc=desc, unit=kind[:-1], mininterval=1)
    if kind == "conversations":
        return pack((render(tokenizer, messages) for messages in items), row_tokens, tokenizer.eot, stats, open_rows)
    sides = ((render_reply(tokenizer, prompt, chosen), render_reply(tokenizer, prompt, rejected))
             for prompt, chosen, rejected in items)
    return pair_rows(sides, row_tokens, tokenizer.eot, stats)


def write_split(out_dir, split, kind, tokenizer, items, block_size, open_rows):
    """Render, pack and write one split; returns its counts and prints them."""
    row_tokens = block_size + 1
    stats = Counter({kind: len(items), "dropped": 0, "padding": 0, "trained_tokens": 0})
    writer = RowWriter(out_dir, split, row_tokens * (2 if kind == "pairs" else 1), tokenizer.vocab_size)
    for ids, mask in rows_of(kind, tokenizer, items, row_tokens, open_rows, stats, f"tokenizing {split}"):
        writer.add(ids, mask)
        stats["trained_tokens"] += sum(mask)
    writer.close()
    stats["rows"] = writer.rows
    padding = stats["padding"] / max(1, writer.rows * writer.row_tokens)
    print(f"{split}: {len(items) - stats['dropped']:,} of {len(items):,} {kind} in {writer.rows:,} rows "
          f"({padding:.0%} padding), {stats['dropped']:,} longer than {row_tokens} tokens dropped, "
          f"{stats['trained_tokens']:,} trained tokens")
    if not items and split == "val":
        print("warning: val is empty: no items held out (train.py evaluates on val: use --val_fraction 0.05)")
    elif not items:
        print(f"warning: {split} is empty: every item went to val (give more items or a smaller --val_fraction)")
    elif not writer.rows:
        print(f"warning: {split} has no rows: every item is longer than a row; raise --block_size")
    return dict(stats)


def write_dataset(out_dir, kind, splits, block_size, open_rows=8):
    """Write every split ({name: items}), tokenizer.json and rows.json into out_dir, in place of any dataset there;
    returns rows.json's content."""
    os.makedirs(out_dir, exist_ok=True)
    clear_dataset(out_dir)
    tokenizer = Tokenizer(chat_spec())
    counts = {split: write_split(out_dir, split, kind, tokenizer, items, block_size, open_rows)
              for split, items in splits.items()}
    packed = open_rows if kind == "conversations" else None  # a preference pair always fills one row
    info = {"kind": kind, "row_tokens": block_size + 1, "pad_id": tokenizer.eot, "open_rows": packed, "splits": counts}
    save_dataset_spec(out_dir, tokenizer.spec)
    write_rows_info(out_dir, info)
    return info


# ----------------------------------------------------------------------------------------------------- command line

def parser_for(doc, default_out_dir):
    """The arguments every post-training prepare script takes; each adds its own --input and source options."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=default_out_dir)
    parser.add_argument("--block_size", type=int, default=1024, help="the training block_size: rows hold it + 1 tokens")
    parser.add_argument("--val_fraction", type=float, default=0.05, help="items held out as the val split")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the val split and the packing order")
    parser.add_argument("--open_rows", type=int, default=8, help="rows open for packing conversations; 0 = one "
                        "conversation per row (no attention across conversations, to measure what packing changes)")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already prepared in out_dir")
    return parser


def check_args(parser, args):
    if args.block_size < 1:
        parser.error(f"--block_size must be >= 1, got {args.block_size}")
    if not 0 <= args.val_fraction < 1:
        parser.error(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    if args.open_rows < 0:
        parser.error(f"--open_rows must be >= 0, got {args.open_rows}")
    missing = [p for p in args.input or [] if not os.path.isfile(p)]
    if missing:
        parser.error(f"--input: no such file {', '.join(missing)}")
    try:
        check_out_dir(args.out_dir, args.overwrite)
    except FileExistsError as e:
        parser.error(str(e))


def main(argv=None):
    parser = parser_for(__doc__, HERE)
    parser.add_argument("--input", nargs="+", required=True, metavar="JSONL", help="conversation or pair files")
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        kind, items = read_items(args.input)
    except ValueError as e:
        sys.exit(f"error: {e}")
    train, val = split_val(items, args.val_fraction, args.seed)
    return write_dataset(args.out_dir, kind, {"train": train, "val": val}, args.block_size, args.open_rows)


if __name__ == "__main__":
    run_main(main)
