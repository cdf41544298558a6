"""TinyStories (V2, written by GPT-4) with the GPT-2 BPE: train/val shards of `--shard_size` tokens.

    python data/tinystories/prepare.py                                # downloads the two text files (~2.2 GB)
    python data/tinystories/prepare.py --input TRAIN.txt [VALID.txt]  # or uses local ones

Stories are separated by <|endoftext|> in the text; each is stripped and empty ones dropped. As in llm.c, the
end-of-text token (50256) goes BEFORE each story, so every story starts right after a delimiter. Tokenizing runs on
`--workers` processes; the text is read in blocks and the tokens written as they come, so memory stays small.
With a single --input file, every `--val_every`-th story is held out as val. A folder that already holds a prepared
dataset is refused unless `--overwrite` is given.
"""
import argparse
import codecs
import itertools
import os
import sys
from multiprocessing import Pool

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
import numpy as np  # noqa: E402
import tiktoken  # noqa: E402
from tqdm import tqdm  # noqa: E402

from nanogpt.download import download_file, run_main  # noqa: E402
from nanogpt.shards import ShardWriter, check_out_dir, clear_dataset  # noqa: E402
from nanogpt.tokenizer import save_dataset_spec  # noqa: E402

BASE_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main"
FILES = {"train": "TinyStoriesV2-GPT4-train.txt", "val": "TinyStoriesV2-GPT4-valid.txt"}
DELIMITER = "<|endoftext|>"
EOT, VOCAB_SIZE = 50256, 50257  # GPT-2's <|endoftext|> id and vocabulary size


def iter_stories(path, block_bytes=1 << 24):
    """The stories of a text file, split on the delimiter, stripped, empties dropped; read in blocks, never whole.
    Invalid UTF-8 is a ValueError naming file:line."""
    decoder, rest, line = codecs.getincrementaldecoder("utf-8")(), "", 1
    with open(path, "rb") as f:
        while True:
            block = f.read(block_bytes)
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                line += block[:max(e.start, 0)].count(b"\n")
                raise ValueError(f"{path}:{line}: not valid UTF-8") from None
            line += text.count("\n")
            *stories, rest = (rest + text).split(DELIMITER)  # the last piece may continue in the next block
            yield from filter(None, map(str.strip, stories))
            if not block:
                break
    if rest.strip():
        yield rest.strip()


def encode_docs(docs):
    """[EOT, *tokens of doc] for each doc, as one uint16 array (compact to send back from a worker).
    A loop of encode_ordinary: encode_ordinary_batch puts every doc through a thread pool, 3x slower on stories."""
    enc = tiktoken.get_encoding("gpt2")  # cached per process after the first call
    out = []
    for doc in docs:
        out.append(EOT)
        out.extend(enc.encode_ordinary(doc))
    return np.array(out, dtype=np.uint16)


def iter_tokens(docs, workers, docs_per_task=1024):
    """Token arrays of docs, in order, EOT before each doc, encoded by `workers` processes."""
    it = iter(docs)
    tasks = iter(lambda: list(itertools.islice(it, docs_per_task)), [])  # lists of docs_per_task docs until none left
    if workers <= 1:
        yield from map(encode_docs, tasks)
        return
    with Pool(workers) as pool:
        yield from pool.imap(encode_docs, tasks)  # in order; the text is read only as fast as the workers encode it


def tokenize_documents(docs, workers):
    """All of docs as one uint16 array, EOT before each doc, encoded by `workers` processes."""
    return np.concatenate([np.zeros(0, np.uint16), *iter_tokens(docs, workers)])


def tokenize_single_process(docs):
    """The reference tokenize_documents is tested against: one process, one doc at a time."""
    enc = tiktoken.get_encoding("gpt2")
    return np.array([t for doc in docs for t in [EOT, *enc.encode_ordinary(doc)]], dtype=np.uint16)


def check_text(path):
    """A TinyStories file has the delimiter within its first MB (an HTML error page does not)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        if DELIMITER not in f.read(1 << 20):
            raise ValueError(f"{path}: no {DELIMITER} in the first MB: not a TinyStories text file")


def story_splits(args):
    """(split, stories) pairs from the two files, or from one file with every val_every-th story as val."""
    if args.input and len(args.input) == 1:
        path, every = args.input[0], args.val_every
        return [("train", (s for i, s in enumerate(iter_stories(path)) if i % every)),
                ("val", (s for i, s in enumerate(iter_stories(path)) if i % every == 0))]
    paths = args.input or [download_file(f"{args.base_url.rstrip('/')}/{FILES[split]}",
                                         os.path.join(args.out_dir, FILES[split]), validate=check_text)
                           for split in ("train", "val")]
    return [("train", iter_stories(paths[0])), ("val", iter_stories(paths[1]))]


def write_split(stories, out_dir, split, shard_size, workers):
    """Tokenize one split's stories and stream them into {split}_NNNNNN.bin shards; returns the shard paths."""
    writer = ShardWriter(out_dir, split, shard_size, vocab_size=VOCAB_SIZE)
    with tqdm(desc=f"tokenizing {split}", unit="tok", unit_scale=True) as bar:
        for tokens in iter_tokens(stories, workers):
            writer.add(tokens)
            bar.update(len(tokens))
    paths = writer.close()
    print(f"{split}: {bar.n:,} tokens in {len(paths)} shard(s)")
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", metavar="TXT", help="local TRAIN.txt [VALID.txt] instead of downloading")
    parser.add_argument("--out_dir", default=HERE)
    parser.add_argument("--base_url", default=BASE_URL)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--shard_size", type=int, default=100_000_000, help="tokens per shard")
    parser.add_argument("--val_every", type=int, default=100, help="with one --input file: every N-th story is val")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already prepared in out_dir")
    args = parser.parse_args(argv)
    if args.input and len(args.input) > 2:
        parser.error("--input takes TRAIN.txt and optionally VALID.txt")
    missing = [p for p in args.input or [] if not os.path.isfile(p)]
    if missing:
        parser.error(f"--input: no such file {', '.join(missing)}")
    try:
        check_out_dir(args.out_dir, args.overwrite)
    except FileExistsError as e:
        parser.error(str(e))
    os.makedirs(args.out_dir, exist_ok=True)
    splits = story_splits(args)
    clear_dataset(args.out_dir)
    try:
        paths = {split: write_split(stories, args.out_dir, split, args.shard_size, args.workers)
                 for split, stories in splits}
    except ValueError as e:  # invalid UTF-8 in an input file
        sys.exit(f"error: {e}")
    save_dataset_spec(args.out_dir, {"kind": "gpt2"})
    return paths


if __name__ == "__main__":
    run_main(main)
