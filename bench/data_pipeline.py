"""Data-pipeline throughput: the TinyStories tokenizer on all workers next to single-process encode_ordinary, and
the repo's BatchLoader reading (8, 4096) batches from a memmapped 200M-token shard, against what one H100 consumes.

    python bench/data_pipeline.py                        # ~20 MB of repeated Tiny Shakespeare, split into paragraphs
    python bench/data_pipeline.py --input FILE.txt       # your own text (documents = blank-line separated paragraphs)

Prints a Markdown report.
"""
import argparse
import datetime
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_CACHE = os.path.join(os.path.dirname(ROOT), "shared", "tiktoken_cache")
if os.path.isdir(SHARED_CACHE):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", SHARED_CACHE)  # GPT-2 BPE offline
import numpy as np  # noqa: E402
import tiktoken  # noqa: E402

from data.tinystories.prepare import tokenize_documents  # noqa: E402
from nanogpt.loader import BatchLoader  # noqa: E402
from nanogpt.shards import write_shard  # noqa: E402

SHAKESPEARE = [os.path.join(ROOT, "data", "shakespeare", "input.txt"),
               os.path.join(os.path.dirname(ROOT), "shared", "data", "tinyshakespeare", "input.txt")]


def read_documents(path, mb):
    """Paragraphs of path, or of Tiny Shakespeare repeated to about `mb` MB."""
    if path is None:
        path = next(p for p in SHAKESPEARE if os.path.exists(p))
        with open(path, encoding="utf-8") as f:
            text = f.read()
        text = "\n\n".join([text] * max(1, round(mb * 1e6 / len(text.encode()))))
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    return path, [p.strip() for p in text.split("\n\n") if p.strip()]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def encode_each(docs):
    enc = tiktoken.get_encoding("gpt2")
    return sum(len(enc.encode_ordinary(d)) for d in docs)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="text file; default: Tiny Shakespeare repeated to --mb MB")
    parser.add_argument("--mb", type=float, default=20)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--shard_tokens", type=int, default=200_000_000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=4096)
    parser.add_argument("--peak_flops", type=float, default=989e12, help="H100 SXM dense bf16")
    parser.add_argument("--mfu", type=float, default=0.5)
    parser.add_argument("--flops_per_token", type=float, default=43.3e9,
                        help="from train.py config/train_7b.py --dry_run=True")
    args = parser.parse_args()

    source, docs = read_documents(args.input, args.mb)
    mb = sum(len(d.encode()) for d in docs) / 1e6
    print(f"# Data pipeline benchmark\n\n{datetime.datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} CPUs "
          f"(load average {os.getloadavg()[0]:.1f}), {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}, numpy {np.__version__}, tiktoken {tiktoken.__version__}\n")
    print(f"## Tokenization, GPT-2 BPE\n\n{mb:.1f} MB in {len(docs):,} documents from "
          f"{os.path.relpath(source, ROOT)}\n")
    print("| method | processes | s | MB/s | tokens/s |\n|---|---|---|---|---|")
    count, dt = timed(lambda: encode_each(docs))
    print(f"| `enc.encode_ordinary` per document | 1 | {dt:.2f} | {mb / dt:.2f} | {count / dt:,.0f} |")
    for workers in sorted({1, args.workers}):
        tokens, dt = timed(lambda: tokenize_documents(docs, workers))
        assert len(tokens) == count + len(docs)  # the same tokens plus one EOT per document
        print(f"| `tokenize_documents` (EOT + `encode_ordinary` per document) | {workers} | {dt:.2f} | {mb / dt:.2f} | "
              f"{len(tokens) / dt:,.0f} |")

    # what one GPU eats: tokens/s = peak FLOP/s x MFU / training FLOPs per token (the 7B config's dry run prints
    # 43.3 GFLOP/token at 4096 context); 50% MFU is generous, so this overstates the demand
    need_tokens = args.peak_flops * args.mfu / args.flops_per_token
    need = need_tokens / (args.batch * args.block_size)
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        write_shard(os.path.join(tmp, "train_000000.bin"), rng.integers(0, 50257, args.shard_tokens, dtype=np.uint16),
                    vocab_size=50257)
        loader = BatchLoader([tmp], "train", args.batch, args.block_size)
        warm = batches_per_s(loader, seconds=3)
        with open(os.path.join(tmp, "train_000000.bin"), "rb") as f:  # evict from the page cache: reads hit the disk
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        cold = batches_per_s(BatchLoader([tmp], "train", args.batch, args.block_size, seed=1), count=200)
    print(f"\n## data.loader.BatchLoader: ({args.batch}, {args.block_size}) batches from a memmapped "
          f"{args.shard_tokens / 1e6:.0f}M-token shard\n")
    print("| page cache | batches/s | tokens/s | x what one H100 needs at 7B |\n|---|---|---|---|")
    for name, rate in (("warm", warm), ("cold (first 200 batches after eviction)", cold)):
        print(f"| {name} | {rate:,.0f} | {rate * args.batch * args.block_size:,.0f} | {rate / need:,.0f}x |")
    print(f"\nOne H100 at 7B needs {need_tokens:,.0f} tokens/s ({need:.3f} batches/s): {args.peak_flops / 1e12:.0f} "
          f"TFLOP/s peak x {args.mfu:.0%} MFU / {args.flops_per_token / 1e9:.1f} GFLOP per token.")


def batches_per_s(loader, seconds=None, count=None):
    n, t0 = 0, time.perf_counter()
    while (count is None or n < count) and (seconds is None or time.perf_counter() - t0 < seconds):
        loader.next_batch()
        n += 1
    return n / (time.perf_counter() - t0)


if __name__ == "__main__":
    main()
