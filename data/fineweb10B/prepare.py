"""FineWeb-10B, GPT-2 tokenized: the shards llm.c and modded-nanogpt train on (kjj0/fineweb10B-gpt2 on Hugging Face).

    python data/fineweb10B/prepare.py                    # val + 8 train shards of 100M tokens (~800M train tokens)
    python data/fineweb10B/prepare.py --num_chunks 103   # all of it (~10B tokens)
    python data/fineweb10B/prepare.py --input DIR        # fineweb_*.bin files already downloaded to DIR

Upstream fineweb_val_000000.bin and fineweb_train_000001.bin, 000002, ... land here as val_000000.bin and
train_000000.bin, 000001, ... (upstream numbers train shards from 1). A download streams into `<name>.part`, resumes
with an HTTP Range request after an interruption, and is renamed to its final name only once its header agrees
with its size, so complete files are skipped on a rerun and a broken one is never mistaken for data. A folder that
already holds shards is refused unless `--overwrite` is given (which a rerun that resumes needs too): then its other
files of a prepared dataset (rows.json, shards of other names) are removed and complete shards of these names kept.
"""
import argparse
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
import numpy as np  # noqa: E402

from nanogpt.download import download_file, run_main  # noqa: E402
from nanogpt.shards import HEADER_BYTES, ShardError, check_out_dir, prepared_files, read_header  # noqa: E402
from nanogpt.tokenizer import save_dataset_spec  # noqa: E402

BASE_URL = "https://huggingface.co/datasets/kjj0/fineweb10B-gpt2/resolve/main"


def shard_files(num_chunks):
    """(upstream name, local name) of the val shard and the first num_chunks train shards."""
    files = [("fineweb_val_000000.bin", "val_000000.bin")]
    return files + [(f"fineweb_train_{i:06d}.bin", f"train_{i - 1:06d}.bin") for i in range(1, num_chunks + 1)]


def check_shard(path):
    """Raise unless path is a shard whose header's token count accounts for the file size exactly."""
    dtype, count = read_header(path)  # bad magic, bad version, truncation
    size, need = os.path.getsize(path), HEADER_BYTES + count * np.dtype(dtype).itemsize
    if size != need:
        raise ShardError(f"{path}: {size:,} bytes but the header says {count:,} tokens ({need:,} bytes)")


def link_or_copy(src, dest):
    """Put a validated local shard at dest: a hard link, or a copy across filesystems."""
    check_shard(src)
    if os.path.exists(dest) and os.path.samefile(src, dest):
        return
    part = dest + ".part"
    if os.path.exists(part):
        os.remove(part)
    try:
        os.link(src, part)
    except OSError:
        shutil.copyfile(src, part)
    os.replace(part, dest)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_chunks", type=int, default=8, help="train shards of 100M tokens (103 = all)")
    parser.add_argument("--out_dir", default=HERE)
    parser.add_argument("--base_url", default=BASE_URL)
    parser.add_argument("--input", metavar="DIR", help="take fineweb_*.bin files from DIR instead of downloading")
    parser.add_argument("--overwrite", action="store_true", help="write into an out_dir that holds shards (to resume "
                        "a download, or replace another dataset)")
    args = parser.parse_args(argv)
    try:
        check_out_dir(args.out_dir, args.overwrite)
    except FileExistsError as e:
        parser.error(str(e))
    files = shard_files(args.num_chunks)
    if args.input:
        missing = [remote for remote, _ in files if not os.path.isfile(os.path.join(args.input, remote))]
        if missing:
            sys.exit(f"--input {args.input}: missing {', '.join(missing)} (fewer --num_chunks?)")
    os.makedirs(args.out_dir, exist_ok=True)
    ours = {local for _, local in files}
    for path in prepared_files(args.out_dir):  # another dataset's, or more chunks than asked: never mixed in
        if os.path.basename(path) not in ours:
            os.remove(path)
    paths = []
    for i, (remote, local) in enumerate(files, 1):
        dest = os.path.join(args.out_dir, local)
        if args.input:
            link_or_copy(os.path.join(args.input, remote), dest)
        else:
            download_file(f"{args.base_url.rstrip('/')}/{remote}", dest, validate=check_shard,
                          desc=f"{local} ({i}/{len(files)})")
        paths.append(dest)
    save_dataset_spec(args.out_dir, {"kind": "gpt2"})
    tokens = sum(read_header(p)[1] for p in paths[1:])
    print(f"{args.out_dir}: val + {len(paths) - 1} train shards, {tokens:,} train tokens")
    return paths


if __name__ == "__main__":
    run_main(main)
