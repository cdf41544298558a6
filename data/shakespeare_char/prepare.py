"""Tiny Shakespeare, character level: train/val shards (90/10 split) plus tokenizer.json (the characters).

    python data/shakespeare_char/prepare.py                 # downloads input.txt when it is missing
    python data/shakespeare_char/prepare.py --input FILE    # or uses a local copy

A folder that already holds a prepared dataset is refused unless `--overwrite` is given.
"""
import argparse
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
import numpy as np  # noqa: E402

from nanogpt.download import SHAKESPEARE_URL, download_file, run_main  # noqa: E402
from nanogpt.files import FileFormatError, read_text  # noqa: E402
from nanogpt.shards import check_out_dir, clear_dataset, write_shard  # noqa: E402
from nanogpt.tokenizer import save_dataset_spec  # noqa: E402


def get_text(input_path, out_dir, url=SHAKESPEARE_URL):
    """The text: read from --input (and copied to out_dir/input.txt), else downloaded once into out_dir/input.txt;
    empty or not UTF-8: exit with the file named."""
    target = os.path.join(out_dir, "input.txt")
    if input_path and not os.path.isfile(input_path):
        sys.exit(f"--input {input_path}: no such file")
    if not input_path and not os.path.exists(target):
        download_file(url, target, desc="tinyshakespeare")
    source = input_path or target
    try:
        text = read_text(source)
    except FileFormatError as e:
        sys.exit(f"error: {e}")
    if not text:
        sys.exit(f"error: {source} is empty: nothing to prepare")
    if os.path.abspath(source) != os.path.abspath(target):
        shutil.copyfile(source, target)
    return text


def parse_args(argv, doc, default_out_dir):
    """--input, --out_dir and --overwrite, the arguments of both tiny-Shakespeare prepare scripts; refuses an
    out_dir that holds a prepared dataset unless --overwrite, then creates out_dir."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="local input.txt instead of downloading")
    parser.add_argument("--out_dir", default=default_out_dir)
    parser.add_argument("--url", default=SHAKESPEARE_URL, help="where to download input.txt from")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already prepared in out_dir")
    args = parser.parse_args(argv)
    try:
        check_out_dir(args.out_dir, args.overwrite)
    except FileExistsError as e:
        parser.error(str(e))
    os.makedirs(args.out_dir, exist_ok=True)
    return args


def main(argv=None):
    args = parse_args(argv, __doc__, HERE)
    text = get_text(args.input, args.out_dir, args.url)
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([stoi[ch] for ch in text], dtype=np.uint16)
    split = int(0.9 * len(ids))
    clear_dataset(args.out_dir)
    write_shard(os.path.join(args.out_dir, "train_000000.bin"), ids[:split], len(chars))
    write_shard(os.path.join(args.out_dir, "val_000000.bin"), ids[split:], len(chars))
    save_dataset_spec(args.out_dir, {"kind": "char", "chars": "".join(chars)})
    print(f"{len(text):,} characters, vocab {len(chars)}: {split:,} train / {len(ids) - split:,} val tokens in "
          f"{args.out_dir}")


if __name__ == "__main__":
    run_main(main)
