"""Throughput of the text pipeline (data/text/prepare.py): MB per CPU-second of each stage in one process, the whole
chain's wall-clock MB/s on --workers processes (with and without language ID), and the tokenizer trainer's seconds
per MB.

    python bench/text_pipeline.py --mb 20 --workers 2

The corpus is built from ../shared (gsm8k, hh-rlhf, MMLU dev, tiny Shakespeare): documents of 10-60 sentences drawn
at random (seeded) from all their sentences, so they are distinct, mostly pass the quality rules and cost what web
prose costs per byte. CPU seconds are reported next to wall time: on a machine shared with other jobs the CPU time
is the number that holds.
"""
import argparse
import csv
import glob
import gzip
import json
import os
import random
import re
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from nanogpt import bpe, dedup, pii, text_filters  # noqa: E402

SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")


def sentences():
    texts = [open(os.path.join(SHARED, "tinyshakespeare", "input.txt"), encoding="utf-8").read()]
    texts += [r["question"] + " " + r["answer"] for r in map(json.loads, open(os.path.join(SHARED, "gsm8k",
                                                                                              "train.jsonl")))]
    with gzip.open(os.path.join(SHARED, "hh-rlhf", "harmless-base-test.jsonl.gz"), "rt") as f:
        texts += [json.loads(line)["chosen"] for line in f]
    for path in glob.glob(os.path.join(SHARED, "mmlu", "dev", "*.csv")):
        texts += [row[0] for row in csv.reader(open(path, encoding="utf-8"))]
    return [s.strip() for t in texts for s in re.split(r"(?<=[.!?])\s+", t) if len(s.split()) >= 4]


def build_corpus(path, mb, seed=0):
    rng, pool, size, docs = random.Random(seed), sentences(), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < mb * 1e6:
            sents = rng.choices(pool, k=rng.randint(10, 60))
            text = "\n".join(" ".join(sents[i:i + 3]) for i in range(0, len(sents), 3))  # a paragraph per 3
            f.write(json.dumps({"text": text}) + "\n")
            size, docs = size + len(text.encode("utf-8")), docs + 1
    return docs


def per_stage(texts):
    """MB per CPU-second of each stage, one process, every document through every stage."""
    import tiktoken
    from nanogpt.langid import load_identifier
    identify, hasher, enc = load_identifier(), dedup.MinHasher(), tiktoken.get_encoding("gpt2")
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    stages = {
        "length": lambda t: text_filters.first_failed_rule(t, text_filters.RULES, text_filters.LENGTH_RULES),
        "language": lambda t: identify(t[:2000]),  # prepare.py's --language_chars default
        "quality": lambda t: text_filters.first_failed_rule(t, {**text_filters.RULES, **dict.fromkeys(
            text_filters.LENGTH_RULES)}),
        "pii": pii.redact,
        "dedup hashes": lambda t: hasher.signature(dedup.normalise(t)),
        "tokenize (GPT-2, tiktoken)": enc.encode_ordinary,
    }
    out = {}
    for name, fn in stages.items():
        t0 = time.process_time()
        for t in texts:
            fn(t)
        out[name] = mb / (time.process_time() - t0)
    index, sigs = dedup.NearDupIndex(14, 8, 0.8), [hasher.signature(dedup.normalise(t)) for t in texts]
    t0 = time.process_time()
    for i, sig in enumerate(sigs):
        index.add(i, sig)
    out["dedup index (main process)"] = mb / (time.process_time() - t0)
    return mb, out


def whole_chain(path, out_dir, workers, extra):
    from data.text.prepare import main
    t0, c0 = time.time(), cpu()
    report = main(["--input", path, "--out_dir", out_dir, "--overwrite", f"--workers={workers}", *extra])
    return report, time.time() - t0, cpu() - c0


def cpu():
    import resource
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=20, help="corpus size")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab_size", type=int, default=8192, help="for the tokenizer trainer's time")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_text_")
    path = os.path.join(tmp, "corpus.jsonl")
    docs = build_corpus(path, args.mb)
    print(f"corpus: {docs:,} documents, {os.path.getsize(path) / 1e6:.1f} MB of JSONL in {path}")
    print(f"load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    texts = [json.loads(line)["text"] for _, line in zip(range(3000), open(path))]
    mb, stages = per_stage(texts)
    print(f"\nper stage, one process, {mb:.1f} MB, every document through every stage (MB per CPU-second):")
    for name, rate in stages.items():
        print(f"  {name:32s} {rate:8.2f}")
    chain = 1 / sum(1 / stages[k] for k in stages if k != "language")
    print(f"  {'chain without language ID':32s} {chain:8.2f}  (harmonic sum of the stages above)")
    for label, extra in (("without language ID", []), ("with language ID (en)", ["--languages=en"])):
        report, wall, cpu_s = whole_chain(path, os.path.join(tmp, "out"), args.workers, extra)
        mb_in = report["bytes_in"] / 1e6
        print(f"\nwhole chain {label}, --workers={args.workers}: {mb_in:.1f} MB in {wall:.1f} s wall = "
              f"{mb_in / wall:.2f} MB/s; {cpu_s:.1f} CPU-s = {mb_in / cpu_s:.2f} MB per CPU-second; kept "
              f"{sum(report['kept'].values()):,} of {report['documents_in']:,}; per stage (MB/CPU-s): "
              f"{report['throughput']['mb_per_cpu_second']}")
    train_texts = texts * max(1, int(10 / mb))  # about 10 MB
    train_mb = sum(len(t.encode("utf-8")) for t in train_texts) / 1e6
    t0 = time.time()
    bpe.train_bpe(iter(train_texts), args.vocab_size)
    seconds = time.time() - t0
    print(f"\ntokenizer trainer (tokenizers, vocab {args.vocab_size}): {train_mb:.1f} MB in {seconds:.1f} s wall = "
          f"{seconds / train_mb:.2f} s/MB (it uses every core)")


if __name__ == "__main__":
    main()
