"""Any corpus of local text files -> filtered, deduplicated, PII-scrubbed train/val shards + tokenizer.json + a report.

    python data/text/prepare.py --input 'corpus/*.jsonl.gz' notes.txt --out_dir data/mycorpus
    python data/text/prepare.py --input ... --out_dir data/mycorpus --vocab_size=8192   # and train a tokenizer

Inputs (globs allowed): .txt (one document per file, or per paragraph / line with --txt_docs), .jsonl and .jsonl.gz
(the --text_field of each row), .parquet (that column; needs pyarrow). They are read as a stream, in the order given.
Each document goes through, in order and each switchable:
  1. length limits (--rules min_chars, max_chars, min_words, max_words)
  2. language identification on the first --language_chars characters (--languages=en,fr keeps those, with
     confidence >= --min_language_confidence; needs py3langid, nanogpt/langid.py; --languages= (empty): off)
  3. quality rules, Gopher / C4 / FineWeb style (nanogpt/text_filters.py; --rules name=threshold,... or name=none)
  4. PII redaction: e-mail, phone, IP, Luhn-checked credit cards -> placeholders (nanogpt/pii.py; --no-pii)
  5. exact deduplication on the normalised text, then MinHash LSH near-duplicates (nanogpt/dedup.py: --jaccard,
     --shingle, --bands, --rows; --no-dedup)
  6. tokenisation with GPT-2's BPE, or a byte-level BPE trained here on the kept train documents (--vocab_size=N,
     nanogpt/bpe.py), <|endoftext|> before each document, into {train,val}_NNNNNN.bin shards (nanogpt/shards.py).
Every --val_every-th kept document (the first included) is val; --order=length writes each split's documents
shortest first (a curriculum: train.py reads a dataset named in its `curriculum` setting in stored order).
Stages 1-4 and 6 run on --workers processes; results come back in input order and every random choice is seeded,
so the same input gives the same shards. The report
(report.json + report.png in --out_dir) counts documents and tokens in, removed per stage and rule, kept; languages;
PII found; duplicate clusters; seconds and MB/s per stage. Shards are written to a staging folder and moved in only
when every split is complete, tokenizer.json last: an interrupted run leaves no dataset that looks complete.
"""
import argparse
import glob
import gzip
import itertools
import json
import os
import resource
import shutil
import sys
import time
from collections import Counter, deque
from multiprocessing import Pool

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
import numpy as np  # noqa: E402

from nanogpt import bpe, dedup, pii, text_filters  # noqa: E402
from nanogpt.files import FileFormatError, numbered_jsonl, write_json  # noqa: E402
from nanogpt.shards import ShardWriter, check_out_dir, clear_dataset  # noqa: E402
from nanogpt.tokenizer import Tokenizer, save_dataset_spec  # noqa: E402

STAGING = ".partial"  # shards are written here and moved into out_dir when complete
KEPT_TEXT = ".kept_{split}.jsonl"  # the kept documents between filtering and tokenising (removed at the end)

# ------------------------------------------------------------------------------------------------------ reading


class InputError(ValueError):
    """Bad input: the message names file (and line) and what to change."""


def input_paths(patterns):
    """The files the --input patterns name, in the order given (each glob sorted); a pattern naming nothing, or a
    file of a kind this script does not read, is an InputError."""
    paths = []
    for pattern in patterns:
        found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not found or not all(os.path.exists(p) for p in found):
            raise InputError(f"--input {pattern}: no such file")
        for path in found:
            if os.path.isdir(path):
                raise InputError(f"--input {path}: a folder; name its files (a glob such as '{path}/*.jsonl')")
            if not path.endswith((".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")):
                raise InputError(f"--input {path}: not .txt, .jsonl, .jsonl.gz or .parquet")
            if not os.access(path, os.R_OK):
                raise InputError(f"--input {path}: not readable (permissions)")
        paths.extend(found)
    return paths


def open_binary(path):
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def read_txt(path, docs):
    """(file:line, text) of a text file: the whole file, each paragraph (blank-line separated) or each line."""
    lines, start, number = [], 1, 0
    try:
        with open_binary(path) as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise InputError(f"{path}:{number}: not valid UTF-8 (byte {e.start} of the line)") from None
                if docs == "line" or (docs == "paragraph" and not line.strip()):
                    text = "".join(lines + [line] if docs == "line" else lines).strip()
                    if text:
                        yield f"{path}:{start}", text
                    lines, start = [], number + 1
                else:
                    lines.append(line)
    except (OSError, EOFError) as e:  # a truncated or corrupt .gz
        raise InputError(f"{path}:{number + 1}: not readable ({e})") from None
    text = "".join(lines).strip()
    if text:
        yield f"{path}:{start}", text


def read_jsonl(path, fields):
    """(file:line, text) of each row: the first of `fields` the row has."""
    try:
        for number, row in numbered_jsonl(path):
            found = [row[f] for f in fields if f in row] if isinstance(row, dict) else []
            if not found or not isinstance(found[0], str):
                keys = ", ".join(list(row)[:6]) if isinstance(row, dict) else type(row).__name__
                raise InputError(f"{path}:{number}: no string field '{','.join(fields)}' (has: {keys}): set "
                                 "--text_field")
            yield f"{path}:{number}", found[0]
    except FileFormatError as e:
        raise InputError(str(e)) from None


def read_parquet(path, fields):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading .parquet needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's errors for a file that is not parquet
        raise InputError(f"{path}: not a parquet file ({e})") from None
    field = next((f for f in fields if f in table.schema_arrow.names), None)
    if field is None:
        raise InputError(f"{path}: no column '{','.join(fields)}' (has: {', '.join(table.schema_arrow.names[:6])}): "
                         "set --text_field")
    row = 0
    for batch in table.iter_batches(columns=[field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            if text:
                yield f"{path}:row {row}", text


def read_documents(paths, text_field="text", txt_docs="file"):
    """(where, text) of every document of the files, streamed in order; where is file:line (file:row N for parquet).
    text_field: a name, or several separated by commas (the first a row has)."""
    fields = [f.strip() for f in text_field.split(",") if f.strip()]
    for path in paths:
        if path.endswith((".jsonl", ".jsonl.gz")):
            yield from read_jsonl(path, fields)
        elif path.endswith(".parquet"):
            yield from read_parquet(path, fields)
        else:
            yield from read_txt(path, txt_docs)

# -------------------------------------------------------------------------------------------- filtering (workers)


_WORKER = {}


def init_filter_worker(settings):
    _WORKER.clear()
    _WORKER["settings"] = settings
    _WORKER["hasher"] = dedup.MinHasher(settings["bands"], settings["rows"], settings["shingle"], settings["seed"])
    if settings["languages"]:
        from nanogpt.langid import load_identifier
        _WORKER["identify"] = load_identifier()


class Meter:
    """CPU seconds and input bytes per stage (CPU time, not wall: the numbers hold on a shared machine)."""

    def __init__(self):
        self.seconds, self.bytes = Counter(), Counter()
        self.last = time.process_time()

    def start(self):
        self.last = time.process_time()

    def stage(self, name, size):
        now = time.process_time()
        self.seconds[name] += now - self.last
        self.bytes[name] += size
        self.last = now


def filter_document(text, meter):
    """One document through stages 1-4 and the dedup hashes: a dict with "removed" (a stage:rule name) or the
    redacted text, its exact key and MinHash signature."""
    s, out, size = _WORKER["settings"], {}, len(text.encode("utf-8"))
    meter.start()
    failed = text_filters.first_failed_rule(text, s["rules"], text_filters.LENGTH_RULES)
    meter.stage("length", size)
    if failed:
        return {"removed": f"length:{failed}"}
    if s["languages"]:
        lang, confidence = _WORKER["identify"](text[:s["language_chars"]])
        out["language"] = lang
        meter.stage("language", size)
        if lang not in s["languages"] or confidence < s["min_language_confidence"]:
            out["removed"] = "language:" + ("not kept" if lang not in s["languages"] else "low confidence")
            return out
    if s["quality"]:
        failed = text_filters.first_failed_rule(text, s["rules"], s["quality_rules"])
        meter.stage("quality", size)
        if failed:
            out["removed"] = f"quality:{failed}"
            return out
    if s["pii"]:
        text, found = pii.redact(text)
        out["pii"] = {k: v for k, v in found.items() if v}
        meter.stage("pii", size)
    if s["dedup"]:
        normalised = dedup.normalise(text)
        out["key"] = dedup.exact_key(normalised)
        out["signature"] = _WORKER["hasher"].signature(normalised) if s["jaccard"] < 1 else None
        meter.stage("dedup", size)
    out["text"] = text
    return out


def filter_chunk(chunk):
    """filter_document over a chunk of (where, text); returns (results, {stage: [cpu seconds, bytes]})."""
    meter = Meter()
    results = [(where, len(text.encode("utf-8")), filter_document(text, meter)) for where, text in chunk]
    return results, {k: [meter.seconds[k], meter.bytes[k]] for k in meter.seconds}


def chunks(docs, max_bytes=1 << 20, max_docs=2048):
    """Lists of documents of about max_bytes (the unit of work sent to a process)."""
    chunk, size = [], 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc[1])
        if size >= max_bytes or len(chunk) >= max_docs:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def ordered_map(function, items, workers, initializer, initargs):
    """function over items on `workers` processes, results in order (in this process when workers <= 1). At most
    2 * workers items are in flight: Pool.imap would read the whole input ahead into memory."""
    if workers <= 1:
        initializer(*initargs)
        yield from map(function, items)
        return
    with Pool(workers, initializer=initializer, initargs=initargs) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.apply_async(function, (item,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

# ------------------------------------------------------------------------------------------- dedup (this process)


class Deduplicator:
    """Exact then near-duplicate decisions in input order; clusters map each kept document to [number of removed
    copies, the first 5 of them] (bounded: a corpus of duplicates does not fill memory with their names)."""

    def __init__(self, settings):
        self.exact = {}
        self.near = dedup.NearDupIndex(settings["bands"], settings["rows"], settings["jaccard"])
        self.clusters = {}

    def duplicate_of(self, where, result):
        """None when the document is kept, else ('exact' or 'near', where of the kept document)."""
        original = self.exact.get(result["key"])
        kind = "exact"
        if original is None and result.get("signature") is not None:
            original, kind = self.near.add(where, result["signature"]), "near"
        if original is None:
            self.exact[result["key"]] = where
            return None
        cluster = self.clusters.setdefault(original, [0, []])
        cluster[0] += 1
        if len(cluster[1]) < 5:
            cluster[1].append(where)
        return kind, original


def filter_corpus(paths, settings, out_dir, workers):
    """Stages 1-5 over the inputs; kept documents go to out_dir's temp files (train, val); returns the report part."""
    report = {"documents_in": 0, "bytes_in": 0, "documents_per_input": Counter(), "removed": Counter(),
              "removed_bytes": Counter(), "languages": Counter(), "pii": Counter(), "kept": {"train": 0, "val": 0}}
    work = Counter()  # (stage, "seconds" or "bytes") -> total
    dedup_seconds = 0.0
    deduplicator = Deduplicator(settings) if settings["dedup"] else None
    files = {split: open(os.path.join(out_dir, KEPT_TEXT.format(split=split)), "w", encoding="utf-8")
             for split in ("train", "val")}
    kept = 0
    removed_log = (open(os.path.join(out_dir, "removed.jsonl"), "w", encoding="utf-8") if settings["log_removed"]
                   else None)
    docs = read_documents(paths, settings["text_field"], settings["txt_docs"])
    try:
        for results, chunk_work in ordered_map(filter_chunk, chunks(docs), workers, init_filter_worker,
                                               (settings,)):
            for stage, (seconds, size) in chunk_work.items():
                work[stage, "seconds"] += seconds
                work[stage, "bytes"] += size
            t0 = time.process_time()
            for where, size, result in results:
                report["documents_in"] += 1
                report["bytes_in"] += size
                report["documents_per_input"][where.rsplit(":", 1)[0]] += 1
                if "language" in result:
                    report["languages"][result["language"]] += 1
                removed, duplicate = result.get("removed"), None
                if removed is None and deduplicator is not None:
                    duplicate = deduplicator.duplicate_of(where, result)
                    removed = f"dedup:{duplicate[0]}" if duplicate else None
                if removed:
                    report["removed"][removed] += 1
                    report["removed_bytes"][removed] += size
                    if removed_log:
                        entry = {"where": where, "removed": removed}
                        if duplicate:
                            entry["duplicate_of"] = duplicate[1]
                        removed_log.write(json.dumps(entry) + "\n")
                    continue
                report["pii"].update(result.get("pii", {}))
                split = "val" if kept % settings["val_every"] == 0 else "train"
                files[split].write(json.dumps({"where": where, "text": result["text"]}, ensure_ascii=False) + "\n")
                report["kept"][split] += 1
                kept += 1
            dedup_seconds += time.process_time() - t0
    finally:
        for f in [*files.values(), *([removed_log] if removed_log else [])]:
            f.close()
    work["dedup", "seconds"] += dedup_seconds  # the hashes in the workers plus the index lookups here
    report["work"] = work
    if deduplicator:
        report["duplicate_clusters"] = cluster_summary(deduplicator.clusters)
    return report


def cluster_summary(clusters, show=10):
    sizes = sorted((n + 1 for n, _ in clusters.values()), reverse=True)
    largest = sorted(clusters.items(), key=lambda kv: (-kv[1][0], kv[0]))[:show]
    return {"clusters": len(clusters), "documents_in_clusters": sum(sizes), "sizes": dict(Counter(sizes)),
            "largest": [{"kept": k, "removed_first": shown, "size": n + 1} for k, (n, shown) in largest]}

# ------------------------------------------------------------------------------------------------- tokenising


def read_kept(path, order="input"):
    """The kept documents' texts, in input order or shortest first (order="length", ties in input order: a
    curriculum; train.py's `curriculum` setting then reads the dataset in this order instead of shuffled)."""
    with open(path, "rb") as f:
        if order == "input":
            for line in f:
                yield json.loads(line)["text"]
            return
        index, offset = [], 0
        for line in f:  # (length, offset) per document: the texts stay on disk
            index.append((len(json.loads(line)["text"]), offset))
            offset += len(line)
        for _, at in sorted(index):
            f.seek(at)
            yield json.loads(f.readline())["text"]


def init_token_worker(spec):
    _WORKER.clear()
    _WORKER["tokenizer"] = Tokenizer(spec)


def encode_chunk(texts):
    """([eot, *ids of text] for each text as one int64 array (special tokens' text stays plain text), CPU seconds,
    bytes)."""
    tok, t0 = _WORKER["tokenizer"], time.process_time()
    out = []
    for text in texts:
        out.append(tok.eot)
        out.extend(tok.encode_ordinary(text))
    return np.array(out, dtype=np.int64), time.process_time() - t0, sum(len(t.encode("utf-8")) for t in texts)


def text_chunks(texts, n=512):
    it = iter(texts)
    return iter(lambda: list(itertools.islice(it, n)), [])


def tokenize_split(spec, kept_path, staging, split, shard_size, workers, work, order="input"):
    """Tokenise a split's kept documents into shards in `staging`; returns (shard paths, tokens)."""
    tok = Tokenizer(spec)
    writer = ShardWriter(staging, split, shard_size, vocab_size=tok.vocab_size)
    tokens = 0
    for ids, seconds, size in ordered_map(encode_chunk, text_chunks(read_kept(kept_path, order)), workers,
                                          init_token_worker, (spec,)):
        writer.add(ids)
        tokens += len(ids)
        work["tokenize", "seconds"] += seconds
        work["tokenize", "bytes"] += size
    return writer.close(), tokens

# --------------------------------------------------------------------------------------------------- the report


def cpu_seconds():
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def plot_report(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    removed = dict(sorted(report["removed"].items(), key=lambda kv: -kv[1]))
    bars = {"kept": report["kept"]["train"] + report["kept"]["val"], **removed}
    axes[0].barh(list(bars)[::-1], list(bars.values())[::-1], color=["C1"] * len(removed) + ["C2"])
    axes[0].set_xscale("log")  # a rule that removes 3 documents of a million still shows
    axes[0].set_title(f"{report['documents_in']:,} documents: kept and removed by stage:rule")
    langs = dict(Counter(report["languages"]).most_common(15))
    axes[1].bar(list(langs), list(langs.values()))
    axes[1].set_title("languages (documents, before the keep-list)" if langs else "language ID off")
    mbps = report["throughput"]["mb_per_cpu_second"]
    axes[2].bar(list(mbps), list(mbps.values()), color="C4")
    axes[2].set_yscale("log")
    axes[2].set_title("MB per CPU-second, per stage")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def finish_report(report, tokens, spec, wall, cpu):
    """The report's totals; per stage: the CPU seconds it took and the MB that reached it, over all processes."""
    mb = report["bytes_in"] / 1e6
    work = report.pop("work")
    stages = [k for k, kind in work if kind == "seconds"]
    report["tokens"] = tokens
    report["tokenizer"] = Tokenizer(spec).describe()
    report["throughput"] = {
        "wall_seconds": round(wall, 3), "cpu_seconds": round(cpu, 3), "mb_in": round(mb, 3),
        "mb_per_second": round(mb / max(wall, 1e-9), 3),
        "cpu_seconds_per_stage": {k: round(work[k, "seconds"], 3) for k in stages},
        "mb_per_stage": {k: round(work[k, "bytes"] / 1e6, 3) for k in stages},
        "mb_per_cpu_second": {k: round(work[k, "bytes"] / 1e6 / work[k, "seconds"], 2)
                              for k in stages if work[k, "seconds"] > 0}}
    for key in ("documents_per_input", "removed", "removed_bytes", "languages", "pii"):
        report[key] = dict(sorted(report[key].items()))
    return report

# ----------------------------------------------------------------------------------------------------- settings


def parse_rules(text):
    """'min_words=20,max_dup_10gram=none' -> the rules with those thresholds (none switches one off)."""
    overrides = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        name, eq, value = item.partition("=")
        if not eq:
            raise text_filters.RuleError(f"--rules {item!r}: expected name=threshold (or name=none)")
        value = value.strip().lower()
        try:
            overrides[name.strip()] = None if value in ("none", "off") else (
                value == "true" if value in ("true", "false") else float(value))
        except ValueError:
            raise text_filters.RuleError(f"--rules {item!r}: the threshold is not a number") from None
    return text_filters.check_rules(overrides)


def make_settings(args):
    rules = parse_rules(args.rules)
    if not 0 < args.jaccard <= 1:
        raise InputError(f"--jaccard={args.jaccard}: a Jaccard threshold is in (0, 1]")
    if args.bands < 1 or args.rows < 1 or args.shingle < 1 or args.val_every < 1:
        raise InputError("--bands, --rows, --shingle and --val_every must be positive")
    return {"rules": rules, "quality_rules": [r for r in rules if r not in text_filters.LENGTH_RULES],
            "quality": args.quality, "pii": args.pii, "dedup": args.dedup, "jaccard": args.jaccard,
            "bands": args.bands, "rows": args.rows, "shingle": args.shingle, "seed": args.seed,
            "languages": [x for x in (args.languages or "").split(",") if x],
            "min_language_confidence": args.min_language_confidence, "language_chars": args.language_chars,
            "text_field": args.text_field,
            "txt_docs": args.txt_docs, "val_every": args.val_every, "log_removed": args.log_removed}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="files or globs (quote them)")
    p.add_argument("--out_dir", required=True, help="the dataset folder, e.g. data/mycorpus")
    p.add_argument("--text_field", default="text", help="the text field of .jsonl rows / .parquet column; several "
                   "separated by commas: the first a row has (e.g. text,content,chosen)")
    p.add_argument("--txt_docs", default="file", choices=("file", "paragraph", "line"), help="a .txt document is")
    p.add_argument("--rules", default="", help="quality/length thresholds: name=value,... (name=none: off); the "
                   f"rules and defaults: {', '.join(f'{k}={v}' for k, v in text_filters.RULES.items())}")
    p.add_argument("--quality", action=argparse.BooleanOptionalAction, default=True, help="quality rules")
    p.add_argument("--languages", default="", help="keep-list, e.g. en,fr (ISO 639-1); empty: no language ID")
    p.add_argument("--min_language_confidence", type=float, default=0.65)
    p.add_argument("--language_chars", type=int, default=2000, help="language ID reads this many characters")
    p.add_argument("--pii", action=argparse.BooleanOptionalAction, default=True, help="PII redaction")
    p.add_argument("--dedup", action=argparse.BooleanOptionalAction, default=True, help="exact + near dedup")
    p.add_argument("--jaccard", type=float, default=0.8, help="near-duplicate threshold (1: exact dedup only)")
    p.add_argument("--shingle", type=int, default=5, help="words per MinHash shingle")
    p.add_argument("--bands", type=int, default=14)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="MinHash seed")
    p.add_argument("--vocab_size", type=int, default=0, help="train a byte-level BPE of this size (0: GPT-2's)")
    p.add_argument("--chat_tokens", action=argparse.BooleanOptionalAction, default=True,
                   help="the trained tokenizer reserves the chat turn markers")
    p.add_argument("--heldout", nargs="*", default=[], metavar="FILE",
                   help="texts to measure the trained tokenizer's bytes/token on vs GPT-2 (.txt or UDHR .html)")
    p.add_argument("--log_removed", action="store_true", help="write removed.jsonl: where, stage:rule, duplicate of")
    p.add_argument("--order", default="input", choices=("input", "length"),
                   help="document order in the shards: as read, or shortest first (a curriculum)")
    p.add_argument("--val_every", type=int, default=100, help="every N-th kept document is val (the first too)")
    p.add_argument("--shard_size", type=int, default=100_000_000, help="tokens per shard")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already prepared in out_dir")
    return p


def train_tokenizer(args, out_dir):
    special = bpe.SPECIAL_TOKENS if args.chat_tokens else (bpe.EOT,)
    name = f"byte-level BPE of {os.path.basename(os.path.normpath(args.out_dir))}"
    return bpe.train_bpe(read_kept(os.path.join(out_dir, KEPT_TEXT.format(split="train"))), args.vocab_size,
                         special, name=name)


def prepare(args):
    t_start, cpu_start = time.time(), cpu_seconds()
    settings = make_settings(args)
    paths = input_paths(args.input)
    check_out_dir(args.out_dir, args.overwrite)
    os.makedirs(args.out_dir, exist_ok=True)
    staging = os.path.join(args.out_dir, STAGING)
    shutil.rmtree(staging, ignore_errors=True)  # a crashed run's leftovers
    os.makedirs(staging)
    report = filter_corpus(paths, settings, staging, args.workers)
    if report["kept"]["train"] == 0:
        removed = ", ".join(f"{k} {v}" for k, v in report["removed"].most_common(4)) or "none"
        raise InputError(f"no training document left: {report['documents_in']} read, {report['kept']['val']} kept "
                         f"for val, removed: {removed}: loosen --rules / --languages or add input")
    t0 = time.perf_counter()
    spec = train_tokenizer(args, staging) if args.vocab_size else {"kind": "gpt2"}
    train_seconds = time.perf_counter() - t0
    tokens, shards = {}, {}
    for split in ("train", "val"):
        shards[split], tokens[split] = tokenize_split(spec, os.path.join(staging, KEPT_TEXT.format(split=split)),
                                                      staging, split, args.shard_size, args.workers, report["work"],
                                                      args.order)
    report = finish_report(report, tokens, spec, time.time() - t_start, cpu_seconds() - cpu_start)
    if args.vocab_size:
        train_mb = os.path.getsize(os.path.join(staging, KEPT_TEXT.format(split="train"))) / 1e6
        report["tokenizer_training"] = {"wall_seconds": round(train_seconds, 3), "vocab_size": args.vocab_size,
                                        "mb_kept_jsonl": round(train_mb, 3),
                                        "seconds_per_mb": round(train_seconds / train_mb, 3)}
    if args.heldout:
        report["compression"] = bpe.compression(spec, bpe.read_heldout(args.heldout))
    report["settings"] = {k: v for k, v in settings.items() if k != "quality_rules"}
    report["inputs"] = paths
    clear_dataset(args.out_dir)  # the old dataset goes only now that the new one is complete
    for name in ("tokenizer.json", "report.json", "report.png", "removed.jsonl"):
        if os.path.exists(os.path.join(args.out_dir, name)):
            os.remove(os.path.join(args.out_dir, name))
    log = [os.path.join(staging, "removed.jsonl")] if args.log_removed else []
    for path in shards["train"] + shards["val"] + log:
        os.replace(path, os.path.join(args.out_dir, os.path.basename(path)))
    shutil.rmtree(staging)
    write_json(os.path.join(args.out_dir, "report.json"), report)
    plot_report(report, os.path.join(args.out_dir, "report.png"))
    save_dataset_spec(args.out_dir, spec)  # last: the folder is a dataset only from here on
    kept = report["kept"]["train"] + report["kept"]["val"]
    print(f"{args.out_dir}: kept {kept:,} of {report['documents_in']:,} documents, {tokens['train']:,} train + "
          f"{tokens['val']:,} val tokens ({report['tokenizer']}); {report['throughput']['mb_per_second']} MB/s; "
          f"report.json, report.png")
    return report


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return prepare(args)
    except (InputError, text_filters.RuleError, FileExistsError) as e:
        sys.exit(f"error: {e}")
    except ValueError as e:  # a tokenizer that cannot be trained or loaded, language ID not installed
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
