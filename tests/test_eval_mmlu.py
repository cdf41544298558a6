"""eval_mmlu.py and nanogpt/tasks/mmlu.py: prompt bytes (both headers), shot dropping, letter scoring (batched, with and without
the shared few-shot prefix), metrics (ECE, the paper's RMS calibration error), the CSV reader, the download cache,
end to end with per-question records."""
import csv
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import threading
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from conftest import ROOT, SHARED

os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken_cache"))  # GPT-2 BPE files, offline

from nanogpt import download  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from nanogpt.checkpoint import results_dir, save_checkpoint  # noqa: E402
from nanogpt.download import DownloadError  # noqa: E402
from nanogpt.scoring import Scorer, make_encoder  # noqa: E402
from nanogpt.tasks import mmlu as E  # noqa: E402
from nanogpt.tokenizer import Tokenizer  # noqa: E402

MMLU = os.path.join(SHARED, "data", "mmlu")
TEST_SUBJECTS = ["abstract_algebra", "college_medicine", "high_school_geography", "marketing", "world_religions"]
GPT2 = Tokenizer({"kind": "gpt2"})

# two rows of abstract_algebra_dev.csv (its 1st and 5th) and a made-up question with a comma, quotes and a newline
SHOT1 = ["Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.", "0", "1", "2", "3", "B"]
SHOT2 = ["Find the characteristic of the ring 2Z.", "0", "3", "12", "30", "A"]
QUESTION = ['Which is "odd", if any?\nPick one.', "1, 3", "2", "4", "none", "A"]
HEADER = "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
SHOT1_TEXT = "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
SHOT2_TEXT = "Find the characteristic of the ring 2Z.\nA. 0\nB. 3\nC. 12\nD. 30\nAnswer: A\n\n"
QUESTION_TEXT = 'Which is "odd", if any?\nPick one.\nA. 1, 3\nB. 2\nC. 4\nD. none\nAnswer:'


def fresh_seed():
    seed = random.randrange(2**31)
    print(f"seed {seed}")
    return seed


# ------------------------------------------------------------------------------------------------ subjects, prompts

def test_categories_cover_the_57_subjects_once():
    listed = [s for names in E.CATEGORIES.values() for s in names]
    on_disk = sorted(f[:-len("_dev.csv")] for f in os.listdir(os.path.join(MMLU, "dev")))
    assert len(listed) == len(set(listed)) == 57 and sorted(listed) == on_disk == E.SUBJECTS
    assert {c: len(v) for c, v in E.CATEGORIES.items()} == {"STEM": 18, "humanities": 13, "social sciences": 12,
                                                            "other": 14}
    # the cases a subcategory decides (categories.py): math, culture, politics, philosophy, other, business
    tricky = {"high_school_statistics": "STEM", "computer_security": "STEM", "human_sexuality": "social sciences",
              "public_relations": "social sciences", "security_studies": "social sciences", "formal_logic":
              "humanities", "world_religions": "humanities", "global_facts": "other", "professional_accounting":
              "other", "management": "other", "econometrics": "social sciences", "high_school_geography":
              "social sciences", "virology": "other", "machine_learning": "STEM"}
    assert {s: E.CATEGORY_OF[s] for s in tricky} == tricky


def test_golden_prompts():
    assert E.prompt_text("abstract_algebra", [SHOT1, SHOT2], QUESTION) == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
        "Find the characteristic of the ring 2Z.\nA. 0\nB. 3\nC. 12\nD. 30\nAnswer: A\n\n"
        'Which is "odd", if any?\nPick one.\nA. 1, 3\nB. 2\nC. 4\nD. none\nAnswer:')
    assert E.prompt_text("us_foreign_policy", [], SHOT2) == (
        "The following are multiple choice questions (with answers) about us foreign policy.\n\n"
        "Find the characteristic of the ring 2Z.\nA. 0\nB. 3\nC. 12\nD. 30\nAnswer:")
    ids, k, cut = E.build_prompt(GPT2.encode, "abstract_algebra", [SHOT1, SHOT2], QUESTION, 1024)
    assert (k, cut) == (2, False) and GPT2.decode(ids) == HEADER + SHOT1_TEXT + SHOT2_TEXT + QUESTION_TEXT
    # the release's evaluate.py: "about {}." filled with format_subject(s), which puts a space before every word
    assert E.prompt_text("us_foreign_policy", [], SHOT2, header="release") == (
        "The following are multiple choice questions (with answers) about  us foreign policy.\n\n"
        "Find the characteristic of the ring 2Z.\nA. 0\nB. 3\nC. 12\nD. 30\nAnswer:")


def test_golden_prompt_from_the_release_files():
    dev = E.read_rows(os.path.join(MMLU, "dev", "high_school_geography_dev.csv"))
    test = E.read_rows(os.path.join(MMLU, "test", "high_school_geography_test.csv"))
    with open(os.path.join(MMLU, "dev", "high_school_geography_dev.csv"), newline="") as f:
        first = next(csv.reader(f))
    assert dev[0] == first
    text = E.prompt_text("high_school_geography", dev[:1], test[0])
    shot = f"{first[0]}\nA. {first[1]}\nB. {first[2]}\nC. {first[3]}\nD. {first[4]}\nAnswer: {first[5]}\n\n"
    assert text.startswith("The following are multiple choice questions (with answers) about high school geography."
                           "\n\n" + shot + test[0][0] + "\nA. ")
    assert text.endswith(f"\nD. {test[0][4]}\nAnswer:")


@pytest.mark.parametrize("kind", ["char", "gpt2"])
def test_shots_are_dropped_from_the_end_then_the_prompt_is_left_truncated(kind):
    texts = HEADER + SHOT1_TEXT + SHOT2_TEXT + QUESTION_TEXT
    tok = Tokenizer({"kind": "char", "chars": "".join(sorted(set(texts)))}) if kind == "char" else GPT2
    n = lambda text: len(tok.encode(text))  # noqa: E731
    full, one, none = n(texts), n(HEADER + SHOT1_TEXT + QUESTION_TEXT), n(HEADER + QUESTION_TEXT)
    if kind == "char":  # one token per character; by hand: header 84, shot 1 56 + 4 choices of 5 + "\nAnswer: B\n\n"
        # 12 = 88, shot 2 39 + (5 + 5 + 6 + 6) + 12 = 73, question 33 + (8 + 5 + 5 + 8) + "\nAnswer:" 8 = 67
        assert (full, one, none) == (84 + 88 + 73 + 67, 84 + 88 + 67, 84 + 67)
    cases = [(full, 2, False), (full - 1, 1, False), (one, 1, False), (one - 1, 0, False), (none, 0, False),
             (none - 1, 0, True), (5, 0, True)]
    for block_size, shots, truncated in cases:
        ids, k, cut = E.build_prompt(tok.encode, "abstract_algebra", [SHOT1, SHOT2], QUESTION, block_size)
        assert (k, cut) == (shots, truncated), block_size
        assert len(ids) <= block_size
        if truncated:
            assert ids == tok.encode(HEADER + QUESTION_TEXT)[-block_size:]  # the end, with "Answer:", is kept


def test_answer_tokens():
    assert E.answer_tokens(GPT2.encode) == ([317, 347, 327, 360], None)  # " A", " B", " C", " D"
    char = Tokenizer({"kind": "char", "chars": " ABCDxyz"})
    ids, note = E.answer_tokens(make_encoder(char))
    assert ids == [1, 2, 3, 4] and "not single tokens" in note
    assert make_encoder(char)("x?A\u00e9 z") == [5, 1, 0, 7]  # characters outside the vocabulary are skipped
    with pytest.raises(ValueError, match="answer letters"):
        E.answer_tokens(make_encoder(Tokenizer({"kind": "char", "chars": " ABCxyz"})))


# ---------------------------------------------------------------------------------------------------------- scoring

class LastTokenModel(torch.nn.Module):
    """Logits one-hot at each position's own token: the prompt's last token decides the answer. The states are the
    tokens' one-hot rows and the head scales them (the model's contract: forward gives states, logits(h) the head)."""
    config = GPTConfig(block_size=64)

    def forward(self, idx, cache=None):
        return torch.nn.functional.one_hot(idx, 400).float()

    def logits(self, h):
        return h * 5


def test_scoring_reads_each_row_at_its_own_last_token():
    letters = [317, 347, 327, 360]
    prompts = [[5, 6, 327], [360], [9, 9, 9, 9, 9, 317], [1, 347], [2, 2, 2, 2, 360]]  # C, D, A, B, D
    logits = Scorer(LastTokenModel(), GPT2, batch_size=2).next_token_logits(prompts, letters)
    assert logits.argmax(-1).tolist() == [2, 3, 0, 1, 3]
    assert logits[0].tolist() == [0.0, 0.0, 5.0, 0.0]


def random_prompts(rng, n, shared=0, vocab=97, block=64):
    """n prompts; with shared > 0 they open with the same `shared` tokens (a subject's few-shot prefix)."""
    prefix = [rng.randrange(vocab) for _ in range(shared)]
    return [prefix + [rng.randrange(vocab) for _ in range(rng.randint(1, block - shared))] for _ in range(n)]


@pytest.mark.parametrize("cfg", [dict(), dict(n_layer=4, n_head=4, n_kv_head=1, attn_pattern="LG", local_window=8,
                                             kv_share=2, n_expert=4, n_dense_layers=1)],
                         ids=["dense", "hybrid-mqa-kvshare-moe"])
def test_batched_scoring_with_and_without_the_shared_prefix_matches_one_prompt_at_a_time(cfg, seed):
    rng = random.Random(seed)
    model = GPT(GPTConfig(block_size=64, vocab_size=97, n_embd=32, **{"n_layer": 2, "n_head": 2, **cfg})).eval()
    prompts = random_prompts(rng, 7, shared=30) + random_prompts(rng, 4)  # a group sharing 30 tokens, 4 others
    prompts[6] = prompts[6][:31]  # a one-token suffix: one query over the prefix's keys, windows included
    groups = ["s"] * 7 + [1, 2, 3, 4]
    letters = [3, 17, 42, 96]
    with torch.no_grad():
        alone = torch.stack([model.logits(model(torch.tensor([p]))[0, -1])[letters] for p in prompts])
    for shared_prefix in (False, True):
        for batch_size in (1, 3, 16):
            scorer = Scorer(model, GPT2, batch_size=batch_size, shared_prefix=shared_prefix)
            got = scorer.next_token_logits(prompts, letters, groups)
            torch.testing.assert_close(got, alone, atol=1e-4, rtol=1e-4)
            clear = (alone.topk(2).values[:, 0] - alone.topk(2).values[:, 1]) > 1e-3  # not a near tie
            assert (got.argmax(-1) == alone.argmax(-1))[clear].all()
    assert Scorer(model, GPT2).plan(prompts, groups, [1] * 11)[1][0] == prompts[0][:30]  # the prefix was shared


# ---------------------------------------------------------------------------------------------------------- metrics

def test_macro_f1_by_hand():
    gold = torch.tensor([0, 0, 1, 1, 2, 3])
    pred = torch.tensor([0, 1, 1, 1, 0, 3])
    # A: TP 1, FP 1 (q4), FN 1 (q1) -> 2/4 = 0.5;  B: TP 2, FP 1 (q1) -> 4/5 = 0.8
    # C: TP 0, FN 1 (q4) -> 0;  D: TP 1 -> 1.0;  mean (0.5 + 0.8 + 0 + 1) / 4 = 0.575
    assert E.macro_f1(pred, gold) == pytest.approx(0.575)
    # C and D are never gold and never predicted: left out (0/0), so the mean is over A (2/3) and B (2/3) only
    assert E.macro_f1(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0])) == pytest.approx(2 / 3)
    assert E.macro_f1(torch.tensor([2, 2]), torch.tensor([2, 2])) == 1.0


def test_ece_by_hand():
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1],     # conf 0.70, right  -> bin [0.7, 0.8)
                          [0.1, 0.75, 0.05, 0.1],   # conf 0.75, wrong  -> bin [0.7, 0.8)
                          [0.4, 0.3, 0.2, 0.1],     # conf 0.40, right  -> bin [0.4, 0.5)
                          [0.25, 0.25, 0.25, 0.25]])  # tie: A, conf 0.25, wrong -> bin [0.2, 0.3)
    gold = torch.tensor([0, 2, 0, 1])
    # bin 0.7: 2/4 * |0.5 - 0.725| = 0.1125;  bin 0.4: 1/4 * |1 - 0.4| = 0.15;  bin 0.2: 1/4 * |0 - 0.25| = 0.0625
    assert E.expected_calibration_error(probs.log(), gold) == pytest.approx(0.325, abs=1e-6)
    assert E.expected_calibration_error(torch.tensor([[9.0, 0, 0, 0]]), torch.tensor([0])) == pytest.approx(
        1 - torch.tensor([9.0, 0, 0, 0]).softmax(0)[0].item(), abs=1e-6)  # one right answer: 1 - confidence


def test_rms_calibration_error_by_hand():
    """calib_tools.rmsce(correct, max prob) as the release's test_calibration.py calls it, worked out by hand."""
    # max prob 0.7 on A: binary confidence 0.7, right when correct; max prob 0.4: confidence 0.6, right when wrong
    high = torch.tensor([0.7, 0.1, 0.1, 0.1], dtype=torch.float64).log()
    low = torch.tensor([0.4, 0.2, 0.2, 0.2], dtype=torch.float64).log()
    logits = torch.stack([high] * 100 + [low] * 100)
    gold = torch.tensor([0] * 60 + [1] * 40 + [0] * 30 + [2] * 70)  # 60 of the 0.7s right, 30 of the 0.4s
    # 200 questions: 2 adaptive bins, upper edge at rank 100 (0.7, which falls in the upper bin): the 0.6s (binary
    # accuracy 70/100) and the 0.7s (60/100); sum of (n_b / N)^2 (acc_b - conf_b)^2 = 2 * 0.25 * 0.01, then two roots
    assert E.rms_calibration_error(logits, gold) == pytest.approx(0.005 ** 0.25, abs=1e-9)
    # fewer than 100 questions: one bin; 3 of 4 at confidence 0.7 right: (1^2 * (0.75 - 0.7)^2) ** (1/4)
    assert E.rms_calibration_error(logits[:4], torch.tensor([0, 0, 0, 1])) == pytest.approx(0.05 ** 0.5, abs=1e-9)


def test_accuracy_and_category_averages_by_hand():
    # abstract_algebra 1/2 and college_physics 3/4 (STEM), marketing 1/1 (other), philosophy 0/3 (humanities)
    rows = [("abstract_algebra", 0, 0), ("abstract_algebra", 1, 2),  # (subject, predicted, gold)
            ("college_physics", 3, 3), ("college_physics", 2, 2), ("college_physics", 1, 1), ("college_physics", 0, 1),
            ("marketing", 2, 2), ("philosophy", 0, 1), ("philosophy", 3, 0), ("philosophy", 1, 2)]
    subject_of = [s for s, _, _ in rows]
    logits = torch.nn.functional.one_hot(torch.tensor([p for _, p, _ in rows]), 4).float()
    r = E.summarize(subject_of, logits, torch.tensor([g for _, _, g in rows]))
    assert r["n"] == 10 and r["accuracy"] == pytest.approx(5 / 10)
    assert r["macro_accuracy"] == pytest.approx((0.5 + 0.75 + 1 + 0) / 4)  # 0.5625
    assert {s: (p["n"], p["accuracy"]) for s, p in r["subjects"].items()} == {
        "abstract_algebra": (2, 0.5), "college_physics": (4, 0.75), "marketing": (1, 1.0), "philosophy": (3, 0.0)}
    stem = r["categories"]["STEM"]
    assert (stem["n"], stem["subjects"]) == (6, 2)
    assert stem["accuracy"] == pytest.approx(4 / 6) and stem["macro_accuracy"] == pytest.approx(0.625)
    assert r["categories"]["other"]["accuracy"] == 1.0 and r["categories"]["humanities"]["accuracy"] == 0.0
    assert "social sciences" not in r["categories"]  # no question of it: no average


# ------------------------------------------------------------------------------------------------ CSVs and subjects

def test_read_rows_parses_quotes_commas_newlines_and_crlf(tmp_path):
    path = tmp_path / "x_dev.csv"
    path.write_bytes(b'"Line one,\r\nline ""two""",a,"b, c",d,e,C\r\nQ2,1,2,3,4,D\r\n')
    assert E.read_rows(str(path)) == [['Line one,\r\nline "two"', "a", "b, c", "d", "e", "C"],
                                      ["Q2", "1", "2", "3", "4", "D"]]


@pytest.mark.parametrize("bad_row, message", [("Q3,1,2,3,D", "expected 6 columns"),
                                              ("Q3,1,2,3,4,E", "answer must be one of A, B, C, D, got 'E'"),
                                              ("Q3,1,2,3,4,", "got ''"), ("Q3,1,2,3,4,AB", "got 'AB'"),
                                              ("Q3,1,2,3,4,D,extra", "got 7")])
def test_malformed_rows_name_file_and_line(tmp_path, bad_row, message):
    path = tmp_path / "x_test.csv"
    path.write_text('"Two\nlines",a,b,c,d,A\nQ2,1,2,3,4,B\n' + bad_row + "\n")  # the bad row starts on line 4
    with pytest.raises(ValueError, match=f"{path}:4: .*{message}"):
        E.read_rows(str(path))


def test_pick_subjects_and_data_root(tmp_path):
    available = {"marketing", "abstract_algebra", "not_a_subject"}
    assert E.pick_subjects("", available) == ["abstract_algebra", "marketing"]
    assert E.pick_subjects(" marketing ,abstract_algebra", available) == ["marketing", "abstract_algebra"]
    with pytest.raises(ValueError, match="unknown subjects \\['astrology'\\]; valid subjects: abstract_algebra, "):
        E.pick_subjects("marketing,astrology", available)
    with pytest.raises(ValueError, match="no val CSV for \\['virology'\\]"):
        E.pick_subjects("virology", available, "val")
    assert E.data_root(MMLU) == MMLU
    os.symlink(MMLU, tmp_path / "data")
    assert E.data_root(str(tmp_path)) == str(tmp_path / "data")
    with pytest.raises(FileNotFoundError, match="no dev/ folder"):
        E.data_root(str(tmp_path / "data" / "dev"))


# --------------------------------------------------------------------------------------------------------- download

def release_tar(subjects=("abstract_algebra", "marketing")):
    """A data.tar in the release's layout, plus an auxiliary_train file (not to be extracted) that makes it larger
    than one 1 MiB download chunk, so that a cut transfer has something to resume from."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for s in subjects:
            for part in ("dev", "val", "test"):
                tar.add(os.path.join(MMLU, part, f"{s}_{part}.csv"), f"data/{part}/{s}_{part}.csv")
        aux = b"q,a,b,c,d,A\n" * 120_000
        info = tarfile.TarInfo("data/auxiliary_train/race.csv")
        info.size = len(aux)
        tar.addfile(info, io.BytesIO(aux))
    return buf.getvalue()


class Server:
    """A real HTTP server on 127.0.0.1 serving `body` at /data.tar; honours Range. While `cuts` > 0 a response
    promises the whole rest but the connection closes at byte `cut`. Every request's Range header is recorded."""

    def __init__(self):
        self.body, self.cut, self.cuts, self.requests = b"", 0, 0, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.headers.get("Range"))
                start = int(self.headers["Range"][6:-1]) if self.headers.get("Range") else 0
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(server.body) - start))
                self.end_headers()
                end = server.cut if server.cuts > 0 else len(server.body)
                server.cuts -= 1
                self.wfile.write(server.body[start:end])
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/data.tar"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def assert_no_valid_cache(cache):
    assert not os.path.exists(os.path.join(cache, "complete"))
    assert not os.path.exists(os.path.join(cache, "data"))
    assert not os.path.exists(os.path.join(cache, "data.tar"))


def assert_extracted(data, subjects=("abstract_algebra", "marketing")):
    assert sorted(os.listdir(data)) == ["dev", "test", "val"]  # no auxiliary_train
    for part in ("dev", "val", "test"):
        assert sorted(os.listdir(os.path.join(data, part))) == sorted(f"{s}_{part}.csv" for s in subjects)
        for s in subjects:
            with open(os.path.join(data, part, f"{s}_{part}.csv"), "rb") as a, \
                    open(os.path.join(MMLU, part, f"{s}_{part}.csv"), "rb") as b:
                assert a.read() == b.read()


def test_a_cut_transfer_is_resumed_and_the_cache_then_reused(server, tmp_path):
    cache = str(tmp_path / "cache")
    server.body, server.cut, server.cuts = release_tar(), 1_200_000, 1
    data = E.fetch_release(server.url, cache)
    assert server.requests == [None, "bytes=1048576-"]  # the first 1 MiB chunk survived the cut
    assert data == os.path.join(cache, "data") and os.path.exists(os.path.join(cache, "complete"))
    assert_extracted(data)
    assert sorted(os.listdir(cache)) == ["complete", "data"]  # no data.tar, .part or half-extracted folder left

    assert E.fetch_release(server.url, cache) == data
    assert len(server.requests) == 2  # the second run downloads nothing


def test_a_transfer_that_keeps_failing_is_no_cache_and_is_resumed_next_run(server, tmp_path, monkeypatch):
    monkeypatch.setattr(download, "RETRIES", 2)  # give up after two cut transfers instead of five
    cache = str(tmp_path / "cache")
    server.body, server.cut, server.cuts = release_tar(), 1_200_000, 2
    with pytest.raises(DownloadError, match="rerun to resume"):
        E.fetch_release(server.url, cache)
    assert_no_valid_cache(cache)
    assert os.path.getsize(os.path.join(cache, "data.tar.part")) == 1 << 20  # kept for the next run

    assert_extracted(E.fetch_release(server.url, cache))
    assert server.requests == [None, "bytes=1048576-", "bytes=1048576-"]


def boundary_cut(body):
    """The tar cut right after its last member: every header reads, but the end-of-archive blocks are gone."""
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        return body[:tar.offset]


@pytest.mark.parametrize("damage", ["inside a member", "between members", "random bytes", "html page"])
def test_truncated_or_corrupt_download_is_never_a_valid_cache(server, tmp_path, damage):
    seed = fresh_seed()
    rng = random.Random(seed)
    cache, good = str(tmp_path / "cache"), release_tar()
    server.body = {"inside a member": good[:rng.randrange(2000, len(good) - 2000)],
                   "between members": boundary_cut(good),
                   "random bytes": rng.randbytes(len(good)),
                   "html page": b"<html><body>Service unavailable</body></html>"}[damage]
    with pytest.raises(DownloadError, match="bad and was deleted.*(corrupt or incomplete|not a readable tar)"):
        E.fetch_release(server.url, cache)
    assert_no_valid_cache(cache)
    assert not os.path.exists(os.path.join(cache, "data.tar.part"))  # complete but bad: not resumed

    server.body = good  # the next run starts over and succeeds
    assert_extracted(E.fetch_release(server.url, cache))


def test_an_extraction_without_its_marker_is_redone(server, tmp_path):
    cache = tmp_path / "cache"
    (cache / "data" / "dev").mkdir(parents=True)
    (cache / "data" / "dev" / "half_written.csv").write_text("x")
    server.body = release_tar(["marketing"])
    assert_extracted(E.fetch_release(server.url, str(cache)), ["marketing"])
    assert len(server.requests) == 1


# ------------------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(fresh_seed())
    cfg = GPTConfig(block_size=256, vocab_size=50257, n_layer=2, n_embd=32, n_head=2)
    out = tmp_path_factory.mktemp("out")
    save_checkpoint({"model": GPT(cfg).state_dict(), "model_args": asdict(cfg), "tokenizer": {"kind": "gpt2"},
                     "config": {}, "iter_num": 0}, str(out / "ckpt.pt"))
    return str(out)


def run_eval(*args):
    p = subprocess.run([sys.executable, "eval_mmlu.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    print(p.stdout[-3000:], p.stderr[-3000:])
    assert p.returncode == 0, p.stderr
    return p.stdout


def check_report(out_dir, subjects, n_each, split):
    with open(os.path.join(out_dir, "mmlu.json")) as f:
        r = json.load(f)
    assert r["split"] == split and r["ntrain"] == 5 and r["block_size"] == 256
    assert {s: p["n"] for s, p in r["subjects"].items()} == {s: n_each for s in subjects}
    assert r["n"] == n_each * len(subjects) and 0.04 <= r["accuracy"] <= 0.6  # random weights: near chance
    for key in ("macro_accuracy", "macro_f1", "ece_10bin", "rms_calibration_error"):
        assert 0.0 <= r[key] <= 1.0
    assert sum(c["n"] for c in r["categories"].values()) == r["n"]
    # 5-shot prompts are longer than 256 tokens: shots were dropped
    assert 0 <= r["mean_shots"] < 5 and 0 < r["fewer_shots"] <= r["n"] and 0 <= r["truncated"] <= r["n"]
    assert r["wall_s"] > 0 and r["questions_per_s"] > 0
    records = r["questions"]  # one per question, in subject order, each with its letter logits
    assert len(records) == r["n"] and [q["id"].split("/")[:2] for q in records[:1]] == [[subjects[0], split]]
    for q in records:
        assert q["prediction"] == "ABCD"[max(range(4), key=q["scores"].__getitem__)] and q["gold"] in "ABCD"
    assert sum(q["prediction"] == q["gold"] for q in records) / r["n"] == pytest.approx(r["accuracy"])
    assert sum(q["shots"] for q in records) / r["n"] == pytest.approx(r["mean_shots"])
    return r


def test_end_to_end_test_split(tiny_ckpt):
    stdout = run_eval(f"--out_dir={tiny_ckpt}", f"--data_dir={MMLU}", "--limit=10", "--batch_size=8")
    r = check_report(tiny_ckpt, TEST_SUBJECTS, 10, "test")
    assert set(r["categories"]) == {"STEM", "humanities", "social sciences", "other"}
    assert "questions/s" in stdout and "marketing" in stdout and "RMS calibration error" in stdout
    # every prompt whole, one at a time (the path before the shared prefix): the same predictions; the model named
    # by its ckpt.pt, so the report lands in that file's folder
    run_eval(f"--out_dir={tiny_ckpt}/ckpt.pt", f"--data_dir={MMLU}", "--limit=10", "--batch_size=1",
             "--shared_prefix=False")
    plain = check_report(tiny_ckpt, TEST_SUBJECTS, 10, "test")
    assert [q["id"] for q in plain["questions"]] == [q["id"] for q in r["questions"]]
    for p, q in zip(plain["questions"], r["questions"]):
        assert p["scores"] == pytest.approx(q["scores"], abs=1e-4)
        margin = sorted(q["scores"])[-1] - sorted(q["scores"])[-2]
        assert p["prediction"] == q["prediction"] or margin < 1e-3, (p, q)


def test_results_go_beside_the_model(tmp_path):
    run, step = tmp_path / "run", tmp_path / "run" / "step_000010"
    step.mkdir(parents=True)
    (run / "ckpt.pt").write_bytes(b"")
    (step / "meta.pt").write_bytes(b"")
    for source in (str(run), str(run / "ckpt.pt"), str(step)):
        assert os.path.abspath(results_dir(source)) == str(run), source
    assert results_dir(f"hf:{tmp_path / 'hf-model'}") == str(tmp_path / "hf-model")


def test_end_to_end_val_split_from_a_download(tiny_ckpt, server, tmp_path):
    server.body = release_tar(["abstract_algebra", "world_religions"])
    cache = str(tmp_path / "cache")
    run_eval(f"--out_dir={tiny_ckpt}", f"--data_url={server.url}", f"--cache_dir={cache}", "--split=val",
             "--limit=8", "--header=release")
    assert check_report(tiny_ckpt, ["abstract_algebra", "world_religions"], 8, "val")["header"] == "release"
    assert len(server.requests) == 1
