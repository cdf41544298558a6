"""Tiny Shakespeare with the GPT-2 BPE (tiktoken): train/val shards, 90/10 split.

    python data/shakespeare/prepare.py                 # downloads input.txt when it is missing
    python data/shakespeare/prepare.py --input FILE    # or uses a local copy

A folder that already holds a prepared dataset is refused unless `--overwrite` is given.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
import numpy as np  # noqa: E402

from data.shakespeare_char.prepare import get_text, parse_args  # noqa: E402
from nanogpt.download import run_main  # noqa: E402
from nanogpt.shards import clear_dataset, write_shard  # noqa: E402
from nanogpt.tokenizer import Tokenizer, save_dataset_spec  # noqa: E402


def main(argv=None):
    args = parse_args(argv, __doc__, HERE)
    text = get_text(args.input, args.out_dir, args.url)
    split = int(0.9 * len(text))
    try:
        enc = Tokenizer({"kind": "gpt2"}).enc
    except ValueError as e:  # offline without tiktoken's cached files: say so in one line
        sys.exit(f"error: {e}")
    clear_dataset(args.out_dir)
    for name, part in (("train", text[:split]), ("val", text[split:])):
        ids = np.array(enc.encode_ordinary(part), dtype=np.uint16)
        write_shard(os.path.join(args.out_dir, f"{name}_000000.bin"), ids, enc.n_vocab)
        print(f"{name}: {len(ids):,} tokens")
    save_dataset_spec(args.out_dir, {"kind": "gpt2"})


if __name__ == "__main__":
    run_main(main)
