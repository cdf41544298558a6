"""Post-training data: GSM8K and HH-RLHF parsing, packing (whole conversations, dropped ones counted), the val
split, masks through the loader (SFT rows, mixtures, preference pairs: resume and ranks), and the prepare scripts'
downloads against a local HTTP server and their --input paths."""
import gzip
import json
import os
import random
from collections import Counter

import numpy as np
import pytest
import tiktoken
from conftest import SHARED, run_script
from test_data_download import server  # noqa: F401  (the local HTTP server fixture)

from data.chat import prepare as chat_prepare
from data.chat.prepare import pack, pair_rows, read_items, split_val
from data.gsm8k import prepare as gsm8k
from data.hh_rlhf import prepare as hh_rlhf
from data.hh_rlhf.prepare import pair, read_pairs
from nanogpt.chat_format import render
from nanogpt.download import DownloadError
from nanogpt.loader import BatchLoader
from nanogpt.shards import write_shard
from nanogpt.tokenizer import Tokenizer, chat_spec, save_dataset_spec

GSM8K_TRAIN = os.path.join(SHARED, "data", "gsm8k", "train.jsonl")
HH_TEST = os.path.join(SHARED, "data", "hh-rlhf", "harmless-base-test.jsonl.gz")
GPT2 = tiktoken.get_encoding("gpt2")
ASSISTANT_END = 50262


def write_jsonl(path, records, compress=False):
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return str(path)


def words(rng, low, high):
    vocabulary = ["apple", "sum", "42", "naïve", "the", "cat", "\n", "x+y"]
    return " ".join(rng.choice(vocabulary) for _ in range(rng.randrange(low, high)))


def random_conversations(rng, n):
    """n conversations of 1-3 user/assistant exchanges (a system message sometimes), some too long for small rows."""
    out = []
    for _ in range(n):
        messages = [{"role": "system", "content": words(rng, 1, 4)}] if rng.random() < 0.3 else []
        for _ in range(rng.randrange(1, 4)):
            messages += [{"role": "user", "content": words(rng, 1, 12)},
                         {"role": "assistant", "content": words(rng, 0, 15)}]
        out.append({"messages": messages})
    return out


def trained_runs(y):
    """The maximal runs of targets != -1 in a (T,) row, as lists."""
    runs, run = [], []
    for t in y.tolist() + [-1]:
        if t != -1:
            run.append(t)
        elif run:
            runs.append(run)
            run = []
    return runs


# ------------------------------------------------------------------------------------------------------------ GSM8K

def test_gsm8k_answers_lose_calculator_annotations_unless_kept():
    record = {"question": "Natalia sold 48 clips. How many?  ",
              "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n24+48 = <<24+48=72>>72\n#### 72"}
    assert gsm8k.conversation(record) == [
        {"role": "user", "content": "Natalia sold 48 clips. How many?"},
        {"role": "assistant", "content": "Natalia sold 48/2 = 24 clips in May.\n24+48 = 72\n#### 72"}]
    assert gsm8k.conversation(record, "keep")[1]["content"] == record["answer"]


def test_gsm8k_bad_record_names_file_and_line(tmp_path):
    good = {"question": "1+1?", "answer": "1+1=2\n#### 2"}
    path = write_jsonl(tmp_path / "g.jsonl", [good, {"question": "2+2?", "answer": "it is 4"}])
    with pytest.raises(ValueError, match=r"g\.jsonl:2: the answer does not end with a '#### <number>' line"):
        gsm8k.read_problems(path)
    path = write_jsonl(tmp_path / "h.jsonl", [good, {"q": "x"}])
    with pytest.raises(ValueError, match=r"h\.jsonl:2: expected"):
        gsm8k.read_problems(path)


def test_gsm8k_offline_train_file_parses_whole():
    problems = gsm8k.read_problems(GSM8K_TRAIN)
    assert len(problems) == 7473
    answers = [p[1]["content"] for p in problems]
    assert not any("<<" in a or ">>" in a for a in answers)
    assert all(a.splitlines()[-1].startswith("#### ") for a in answers)


# ---------------------------------------------------------------------------------------------------------- HH-RLHF

def hh(*turns):
    return "".join(f"\n\n{speaker}: {text}" for speaker, text in turns)


def test_hh_multi_turn_pair_shares_the_prompt():
    prompt = [("Human", "Hi there"), ("Assistant", "Hello. How can I help?"), ("Human", "Tell me a joke "),
              ("Human", "a short one")]
    record = {"chosen": hh(*prompt, ("Assistant", " Why did the chicken cross the road?")),
              "rejected": hh(*prompt, ("Assistant", "No."))}
    assert pair(record) == ([{"role": "user", "content": "Hi there"},
                             {"role": "assistant", "content": "Hello. How can I help?"},
                             {"role": "user", "content": "Tell me a joke\n\na short one"}],  # one speaker: one turn
                            "Why did the chicken cross the road?", "No.")


def test_hh_malformed_lines_name_file_and_line(tmp_path):
    good = {"chosen": hh(("Human", "a"), ("Assistant", "b")), "rejected": hh(("Human", "a"), ("Assistant", "c"))}
    for bad, message in [({"chosen": "Human: a\n\nAssistant: b", "rejected": good["rejected"]}, "starting with"),
                         ({"chosen": good["chosen"]}, "expected"), ("not json {", "not a JSON object")]:
        path = tmp_path / "hh.jsonl"
        path.write_text(json.dumps(good) + "\n\n" + (bad if isinstance(bad, str) else json.dumps(bad)) + "\n")
        with pytest.raises(ValueError, match=rf"hh\.jsonl:3: .*{message}"):
            read_pairs(str(path))


def test_hh_unusable_pairs_are_skipped_with_their_lines(tmp_path):
    good = {"chosen": hh(("Human", "a"), ("Assistant", "b")), "rejected": hh(("Human", "a"), ("Assistant", "c"))}
    differ = {"chosen": hh(("Human", "a"), ("Assistant", "b"), ("Human", "d"), ("Assistant", "e")),
              "rejected": hh(("Human", "a"), ("Assistant", "x"), ("Human", "d"), ("Assistant", "e"))}
    unanswered = {"chosen": hh(("Human", "a")), "rejected": hh(("Human", "a"), ("Assistant", "c"))}
    path = write_jsonl(tmp_path / "hh.jsonl.gz", [good, differ, good, unanswered], compress=True)
    pairs, skipped = read_pairs(path)
    assert len(pairs) == 2
    assert skipped == {"chosen and rejected differ before the last reply": [2],
                       "a side does not end with an Assistant reply": [4]}


def test_hh_offline_file_parses_whole():
    pairs, skipped = read_pairs(HH_TEST)
    assert len(pairs) == 2312 and skipped == {}
    for prompt, chosen, rejected in pairs:
        roles = [m["role"] for m in prompt]
        assert roles[0] == roles[-1] == "user" and all(a != b for a, b in zip(roles, roles[1:]))


# ---------------------------------------------------------------------------------------------- packing, val split

def test_packing_keeps_conversations_whole_and_counts_the_dropped(seed):
    rng = random.Random(seed)
    row_tokens = 40
    samples = [([i + 1] * n, [rng.randrange(2) for _ in range(n)]) for i, n in
               enumerate(rng.randrange(1, 60) for _ in range(300))]  # ids: the sample's number, repeated
    stats = Counter()
    rows = list(pack(samples, row_tokens, pad_id=0, stats=stats))
    assert all(len(ids) == len(mask) == row_tokens for ids, mask in rows)
    too_long = [i + 1 for i, (ids, _) in enumerate(samples) if len(ids) > row_tokens]
    assert stats["dropped"] == len(too_long) > 0
    placed = {}
    for ids, mask in rows:
        end = len(ids) - next((k for k, t in enumerate(reversed(ids)) if t), len(ids))  # padding only at the end
        assert all(t == 0 for t in ids[end:]) and not any(mask[end:]) and 0 not in ids[:end]
        start = 0
        for k in range(1, end + 1):
            if k == end or ids[k] != ids[start]:
                number = ids[start]
                assert number not in placed  # in one piece, once
                placed[number] = (ids[start:k], mask[start:k])
                start = k
    assert stats["padding"] == sum(row_tokens - sum(1 for t in ids if t) for ids, _ in rows)
    assert sorted(placed) == [i + 1 for i, (ids, _) in enumerate(samples) if len(ids) <= row_tokens]
    assert all(placed[number] == samples[number - 1] for number in placed)  # never truncated, mask travels along
    kept = [sample for sample in samples if len(sample[0]) <= row_tokens]
    unpacked = list(pack(samples, row_tokens, 0, Counter(), open_rows=0))  # one sample per row
    assert len(unpacked) == len(kept) > len(rows)
    assert all((ids[:len(want)], mask[:len(want)]) == (want, want_mask) and not any(ids[len(want):])
               for (ids, mask), (want, want_mask) in zip(unpacked, kept))


def test_pair_rows_drop_pairs_with_a_long_side():
    short, long = ([1, 2, 3], [0, 1, 1]), ([5] * 11, [1] * 11)
    stats = Counter()
    rows = list(pair_rows([(short, short), (short, long), (long, short), (short, ([4], [1]))], 10, 0, stats))
    assert stats["dropped"] == 2 and len(rows) == 2
    assert rows[1] == ([1, 2, 3] + [0] * 7 + [4] + [0] * 9, [0, 1, 1] + [0] * 7 + [1] + [0] * 9)


def test_val_split_is_fixed_by_the_seed(seed):
    items = list(range(1000))
    train, val = split_val(items, 0.05, seed)
    assert len(val) == 50 and sorted(train + val) == items
    assert split_val(items, 0.05, seed) == (train, val)
    assert set(split_val(items, 0.05, seed + 1)[1]) != set(val)
    assert split_val(items, 0.0, seed)[1] == [] and len(split_val(items[:3], 0.01, seed)[1]) == 1


# ------------------------------------------------------------------------------------------------------ the loader

def prepare_chat(tmp_path, records, block_size, name="chat", val_fraction=0.2):
    out = tmp_path / name
    path = write_jsonl(tmp_path / f"{name}.jsonl", records)
    info = chat_prepare.main(["--input", path, "--out_dir", str(out), "--block_size", str(block_size),
                              "--val_fraction", str(val_fraction)])
    return str(out), info


def epoch(data_dir, split, block_size, rows):
    """Every row of a split once, in the loader's order."""
    loader = BatchLoader([data_dir], split, 1, block_size)
    return [loader.next_batch() for _ in range(rows)]


def test_sft_targets_are_exactly_the_assistant_replies(tmp_path, seed):
    rng = random.Random(seed)
    records = random_conversations(rng, 60)
    block_size = 48
    data_dir, info = prepare_chat(tmp_path, records, block_size)
    tokenizer = Tokenizer(chat_spec())
    kept = [r["messages"] for r in records if len(render(tokenizer, r["messages"])[0]) <= block_size + 1]
    assert sum(info["splits"][s]["dropped"] for s in ("train", "val")) == len(records) - len(kept) > 0
    runs = Counter()
    for split in ("train", "val"):
        batches = epoch(data_dir, split, block_size, info["splits"][split]["rows"])
        for x, y in batches:
            assert x.shape == y.shape == (1, block_size)
            trained = y[0] != -1
            assert (y[0, :-1][trained[:-1]] == x[0, 1:][trained[:-1]]).all()  # the targets are the next tokens
            runs.update(tuple(run) for run in trained_runs(y[0]))
        assert sum(int((y != -1).sum()) for _, y in batches) == info["splits"][split]["trained_tokens"]
    want = Counter(tuple(GPT2.encode_ordinary(m["content"]) + [ASSISTANT_END])
                   for messages in kept for m in messages if m["role"] == "assistant")
    assert runs == want


def test_block_size_must_match_the_prepared_rows(tmp_path):
    data_dir, _ = prepare_chat(tmp_path, random_conversations(random.Random(0), 10), 64)
    with pytest.raises(ValueError, match=r"prepared for block_size 64, this run has 32: .*--block_size 32"):
        BatchLoader([data_dir], "train", 2, 32)


def test_sft_mixes_with_a_token_stream(tmp_path, seed):
    block_size = 64
    data_dir, _ = prepare_chat(tmp_path, random_conversations(random.Random(seed), 40), block_size)
    plain = tmp_path / "plain"
    plain.mkdir()
    write_shard(plain / "train_000000.bin", np.random.default_rng(seed).integers(0, 50257, 5000), vocab_size=50304)
    save_dataset_spec(plain, chat_spec())
    loader = BatchLoader([data_dir, str(plain)], "train", 32, block_size, seed=seed, weights=[0.5, 0.5])
    x, y = loader.next_batch()
    masked = (y == -1).any(1)
    assert 0 < int(masked.sum()) < 32  # rows of both datasets, the token stream's without a mask
    assert (y[~masked, :-1] == x[~masked, 1:]).all()


def random_pairs(rng, n):
    out = []
    for _ in range(n):
        prompt = random_conversations(rng, 1)[0]["messages"][:-1]
        out.append({"prompt": prompt, "chosen": words(rng, 0, 20), "rejected": words(rng, 0, 20)})
    return out


def test_pairs_share_the_prompt_and_mask_the_replies(tmp_path, seed):
    rng = random.Random(seed)
    records = random_pairs(rng, 50)
    block_size = 56
    data_dir, info = prepare_chat(tmp_path, records, block_size, "pairs")
    assert info["kind"] == "pairs" and sum(info["splits"][s]["dropped"] for s in ("train", "val")) > 0
    replies = {(tuple(GPT2.encode_ordinary(r["chosen"]) + [ASSISTANT_END]),
                tuple(GPT2.encode_ordinary(r["rejected"]) + [ASSISTANT_END])) for r in records}
    seen = 0
    for split in ("train", "val"):
        for xc, yc, xr, yr in epoch(data_dir, split, block_size, info["splits"][split]["rows"]):
            start = int((yc[0] != -1).nonzero()[0])
            assert start == int((yr[0] != -1).nonzero()[0]) and (xc[0, :start + 1] == xr[0, :start + 1]).all()
            (chosen,), (rejected,) = trained_runs(yc[0]), trained_runs(yr[0])
            assert (tuple(chosen), tuple(rejected)) in replies
            seen += 1
    assert seen == sum(info["splits"][s]["pairs"] - info["splits"][s]["dropped"] for s in ("train", "val"))


def test_pair_loader_resumes_exactly_and_splits_ranks(tmp_path, seed):
    data_dir, _ = prepare_chat(tmp_path, random_pairs(random.Random(seed), 60), 64, "pairs", val_fraction=0.1)
    loader = BatchLoader([data_dir], "train", 4, 64, seed=seed)
    for _ in range(5):
        loader.next_batch()
    resumed = BatchLoader([data_dir], "train", 4, 64, seed=seed)
    resumed.load_state_dict(loader.state_dict())
    for _ in range(20):  # across epochs
        assert all((a == b).all() for a, b in zip(loader.next_batch(), resumed.next_batch()))
    whole = BatchLoader([data_dir], "train", 4, 64, seed=seed).next_batch()
    ranks = [BatchLoader([data_dir], "train", 2, 64, rank=r, world_size=2, seed=seed).next_batch() for r in (0, 1)]
    assert all((whole[i] == np.concatenate([ranks[0][i], ranks[1][i]])).all() for i in range(4))


def test_pairs_do_not_mix_with_conversations(tmp_path):
    pairs_dir, _ = prepare_chat(tmp_path, random_pairs(random.Random(0), 10), 256, "pairs")
    chat_dir, _ = prepare_chat(tmp_path, random_conversations(random.Random(0), 10), 256)
    with pytest.raises(ValueError, match="pairs mix only with pairs"):
        BatchLoader([chat_dir, pairs_dir], "train", 2, 256)


# -------------------------------------------------------------------------------------------- the prepare scripts

def test_chat_prepare_names_the_bad_line(tmp_path):
    records = random_conversations(random.Random(0), 3)
    path = write_jsonl(tmp_path / "c.jsonl", records[:2] + [{"messages": [{"role": "user", "content": "no reply"}]}])
    result = run_script("data/chat/prepare.py", "--input", path, "--out_dir", tmp_path / "out", check=False)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        f"error: {path}:3: the conversation has no assistant message: nothing to learn"]
    mixed = write_jsonl(tmp_path / "m.jsonl", records[:1] + random_pairs(random.Random(0), 1))
    with pytest.raises(ValueError, match=r"m\.jsonl:2: a pair among conversations"):
        read_items([mixed])


def gsm8k_args(server, out):  # noqa: F811  (a parameter named like the fixture)
    return ["--base_url", server.url, "--out_dir", str(out), "--block_size", "512"]


def test_gsm8k_download_then_rerun_makes_no_requests(server, tmp_path):  # noqa: F811
    lines = open(GSM8K_TRAIN, encoding="utf-8").readlines()
    (server.root / "train.jsonl").write_text("".join(lines[:40]), encoding="utf-8")
    (server.root / "test.jsonl").write_text("".join(lines[40:50]), encoding="utf-8")
    out = tmp_path / "gsm8k"
    info = gsm8k.main(gsm8k_args(server, out))
    assert {s: c["conversations"] for s, c in info["splits"].items()} == {"train": 38, "val": 2, "test": 10}
    assert json.loads((out / "tokenizer.json").read_text()) == chat_spec()
    assert sorted(name for name, _ in server.log) == ["test.jsonl", "train.jsonl"]
    server.log.clear()
    with pytest.raises(SystemExit):  # a folder holding a dataset is not written into unasked
        gsm8k.main(gsm8k_args(server, out))
    assert gsm8k.main(gsm8k_args(server, out) + ["--overwrite"]) == info
    assert server.log == []


def test_gsm8k_error_page_is_not_kept(server, tmp_path):  # noqa: F811
    (server.root / "train.jsonl").write_text("<html>rate limited</html>")
    with pytest.raises(DownloadError, match="train.jsonl: the downloaded file is bad"):
        gsm8k.main(gsm8k_args(server, tmp_path / "gsm8k"))
    assert not (tmp_path / "gsm8k" / "train.jsonl").exists()


def test_gsm8k_input_file(tmp_path):
    info = gsm8k.main(["--input", GSM8K_TRAIN, "--out_dir", str(tmp_path / "g"), "--block_size", "512"])
    assert info["splits"]["val"]["conversations"] == 374 and "test" not in info["splits"]
    assert info["splits"]["train"]["dropped"] == 0 and info["row_tokens"] == 513


def test_hh_download_and_lfs_pointer(server, tmp_path):  # noqa: F811
    (server.root / "harmless-base").mkdir()
    with gzip.open(HH_TEST, "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(30)]
    with gzip.open(server.root / "harmless-base" / "train.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(lines))
    args = ["--base_url", server.url, "--subsets", "harmless-base", "--block_size", "1024"]
    info = hh_rlhf.main(args + ["--out_dir", str(tmp_path / "hh")])
    assert info["kind"] == "pairs" and info["splits"]["train"]["pairs"] + info["splits"]["val"]["pairs"] == 30
    assert server.log == [("train.jsonl.gz", None)]
    (server.root / "harmless-base" / "train.jsonl.gz").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
    with pytest.raises(DownloadError, match="Git LFS pointer"):
        hh_rlhf.main(args + ["--out_dir", str(tmp_path / "hh2")])


def test_hh_input_file_from_the_command_line(tmp_path):
    result = run_script("data/hh_rlhf/prepare.py", "--input", HH_TEST, "--out_dir", tmp_path / "hh",
                        "--block_size", "256")
    info = json.loads((tmp_path / "hh" / "rows.json").read_text())
    assert info["row_tokens"] == 257 and "dropped" in result.stdout
    assert info["splits"]["val"]["pairs"] == 116 and info["splits"]["train"]["dropped"] > 0


def test_val_fraction_0_warns_with_advice_that_works(tmp_path, seed, capsys):
    chats = write_jsonl(tmp_path / "chats.jsonl", random_conversations(random.Random(seed), 40))
    out = str(tmp_path / "chat")
    info = chat_prepare.main(["--input", chats, "--out_dir", out, "--block_size", "256", "--val_fraction", "0"])
    assert info["splits"]["val"]["rows"] == 0
    advice = capsys.readouterr().out.split("val is empty")[1].splitlines()[0]
    assert "--val_fraction 0.05" in advice and "--block_size" not in advice
    with pytest.raises(ValueError, match="'val' shards hold no rows .* --val_fraction 0.05"):
        BatchLoader([out], "val", 1, 256)
    info = chat_prepare.main(["--input", chats, "--out_dir", out, "--block_size", "256", "--val_fraction", "0.05",
                              "--overwrite"])  # the advice, followed
    assert info["splits"]["val"]["conversations"] == 2 and info["splits"]["val"]["rows"] >= 1
    x, y = BatchLoader([out], "val", 1, 256, seed=seed).next_batch()  # train.py's val split reads
    assert x.shape == (1, 256) and (y >= 0).any()
