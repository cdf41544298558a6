"""Downloads against a real local HTTP server (Range requests, cut-off responses, corrupt files) and the
FineWeb / TinyStories prepare scripts: resume, validation, idempotent reruns, offline --input, parallel tokenizing."""
import functools
import json
import os
import random
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from conftest import ROOT, SHARED

from data.fineweb10B import prepare as fineweb
from data.fineweb10B.prepare import check_shard, shard_files
from data.tinystories import prepare as tinystories
from data.tinystories.prepare import EOT, FILES, iter_stories, iter_tokens, tokenize_documents, tokenize_single_process
from nanogpt import download
from nanogpt.download import DownloadError, download_file
from nanogpt.shards import ShardError, read_shard, shard_paths, write_shard

os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken_cache"))  # GPT-2 BPE offline
import tiktoken  # noqa: E402

SHAKESPEARE = os.path.join(SHARED, "data", "tinyshakespeare", "input.txt")


class RangeHandler(SimpleHTTPRequestHandler):
    """GET for the files under `directory`, with "bytes=N-" Range requests (206, or 416 past the end); logs every
    request on the server. server.cuts > 0: the next that many responses stop after server.cut_after body bytes.
    server.ignore_range: answer every request with the whole file (200), as some servers do."""

    def do_GET(self):
        server = self.server
        server.log.append((os.path.basename(self.path), self.headers.get("Range")))
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            return self.send_error(404)
        with open(path, "rb") as f:
            data = f.read()
        start = 0
        byte_range = None if server.ignore_range else self.headers.get("Range")
        if byte_range:
            start = int(byte_range.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))  # the full length even when the body gets cut below
        self.end_headers()
        if server.cuts:
            server.cuts -= 1
            body, self.close_connection = body[:server.cut_after], True
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # a proxy from the environment must not see the local server
    root = tmp_path / "remote"
    root.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RangeHandler, directory=str(root)))
    httpd.root, httpd.log, httpd.cuts, httpd.cut_after, httpd.ignore_range = root, [], 0, 0, False
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def rng():
    seed = random.SystemRandom().randrange(2**31)
    print(f"seed {seed}")
    return np.random.default_rng(seed)


def make_fineweb(folder, rng, num_chunks=2):
    """Upstream-named shards of random tokens and lengths in folder; returns {local name: expected bytes}."""
    want = {}
    for remote, local in shard_files(num_chunks):
        write_shard(folder / remote, rng.integers(0, 50257, rng.integers(5000, 20000)), vocab_size=50257)
        want[local] = (folder / remote).read_bytes()
    return want


def fineweb_args(server, out, num_chunks=2):
    return ["--base_url", server.url, "--out_dir", str(out), "--num_chunks", str(num_chunks)]


def make_stories(rng, n):
    """n stories of 1-4 consecutive Shakespeare paragraphs from a random place, stripped as the prepare script does."""
    with open(SHAKESPEARE, encoding="utf-8") as f:
        paragraphs = [p.strip() for p in f.read().split("\n\n") if p.strip()]
    i, stories = int(rng.integers(0, len(paragraphs) - 4 * n)), []
    for _ in range(n):
        k = int(rng.integers(1, 5))
        stories.append("\n\n".join(paragraphs[i:i + k]))
        i += k
    return stories


def write_stories(path, stories):
    path.write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories), encoding="utf-8")  # TinyStories' layout


def read_docs(out, split):
    """The documents of a split's shards: checks EOT comes first, then decodes what lies between EOTs."""
    tokens = np.concatenate([read_shard(p) for p in shard_paths(out, split)])
    assert tokens[0] == EOT
    starts = np.flatnonzero(tokens == EOT)
    enc = tiktoken.get_encoding("gpt2")
    return [enc.decode(tokens[a + 1:b].tolist()) for a, b in zip(starts, [*starts[1:], len(tokens)])]


def files(out):
    """{name: bytes} of a prepared folder's data files (not its tokenizer.json)."""
    return {p.name: p.read_bytes() for p in out.iterdir() if p.name != "tokenizer.json"}


# ------------------------------------------------------------------------------------------------------ downloads


def test_fineweb_download_then_rerun_makes_no_requests(server, tmp_path, rng):
    want = make_fineweb(server.root, rng)
    out = tmp_path / "out"
    paths = fineweb.main(fineweb_args(server, out))
    assert [os.path.basename(p) for p in paths] == ["val_000000.bin", "train_000000.bin", "train_000001.bin"]
    assert files(out) == want  # byte for byte, and no .part left behind
    assert json.loads((out / "tokenizer.json").read_text()) == {"kind": "gpt2"}  # the dataset says how it was written
    assert [r for _, r in server.log] == [None] * 3
    server.log.clear()
    with pytest.raises(SystemExit):  # a folder holding a dataset is not written into unasked
        fineweb.main(fineweb_args(server, out))
    fineweb.main(fineweb_args(server, out) + ["--overwrite"])  # asked: complete shards are checked and kept
    assert server.log == []


def test_interrupted_download_resumes_with_range(server, tmp_path, rng, monkeypatch):
    want = make_fineweb(server.root, rng, 0)["val_000000.bin"]
    url, dest = f"{server.url}/fineweb_val_000000.bin", str(tmp_path / "val_000000.bin")
    cut = 3 * 1024  # whole client chunks, so the .part holds exactly the bytes sent before the cut
    server.cuts, server.cut_after = 1, cut
    download_file(url, dest, validate=check_shard, chunk_size=1024)  # cut once, resumed within the call
    assert open(dest, "rb").read() == want
    assert server.log == [("fineweb_val_000000.bin", None), ("fineweb_val_000000.bin", f"bytes={cut}-")]

    # an interruption that outlasts the retries leaves only the .part, which the next run resumes
    os.remove(dest)
    server.log.clear()
    server.cuts = 1
    monkeypatch.setattr(download, "RETRIES", 1)
    with pytest.raises(DownloadError, match="rerun to resume"):
        download_file(url, dest, validate=check_shard, chunk_size=1024)
    assert not os.path.exists(dest) and os.path.getsize(dest + ".part") == cut
    download_file(url, dest, validate=check_shard, chunk_size=1024)
    assert open(dest, "rb").read() == want and not os.path.exists(dest + ".part")
    assert [r for _, r in server.log] == [None, f"bytes={cut}-"]


def test_server_that_ignores_range_or_answers_416(server, tmp_path, rng):
    want = make_fineweb(server.root, rng, 0)["val_000000.bin"]
    url, dest = f"{server.url}/fineweb_val_000000.bin", str(tmp_path / "val_000000.bin")
    with open(dest + ".part", "wb") as f:
        f.write(b"x" * 100)  # would corrupt the file if the 200 answer were appended to it
    server.ignore_range = True
    download_file(url, dest, validate=check_shard)
    assert open(dest, "rb").read() == want and server.log[0][1] == "bytes=100-"

    os.remove(dest)
    with open(dest + ".part", "wb") as f:
        f.write(want)  # complete but never renamed: the server answers 416 and nothing is sent again
    server.ignore_range = False
    server.log.clear()
    download_file(url, dest, validate=check_shard)
    assert open(dest, "rb").read() == want and [r for _, r in server.log] == [f"bytes={len(want)}-"]


def test_bad_files_in_out_dir_are_fetched_again(server, tmp_path, rng):
    want = make_fineweb(server.root, rng)
    out = tmp_path / "out"
    out.mkdir()
    (out / "val_000000.bin").write_bytes(b"<html>rate limited</html>")  # bad header
    (out / "train_000000.bin").write_bytes(want["train_000000.bin"] + b"\0\0")  # header fine, size wrong
    (out / "train_000001.bin").write_bytes(want["train_000001.bin"])  # complete: must not be fetched
    fineweb.main(fineweb_args(server, out) + ["--overwrite"])
    assert files(out) == want
    assert sorted(name for name, _ in server.log) == ["fineweb_train_000001.bin", "fineweb_val_000000.bin"]


def test_corrupt_remote_shard_is_a_clear_error_and_leaves_no_file(server, tmp_path, rng):
    want = make_fineweb(server.root, rng)
    bad = server.root / "fineweb_train_000002.bin"
    bad.write_bytes(np.int32(12345).tobytes() + bad.read_bytes()[4:])
    out = tmp_path / "out"
    with pytest.raises(DownloadError, match="fineweb_train_000002.bin: the downloaded file is bad.*bad magic 12345"):
        fineweb.main(fineweb_args(server, out))
    good = ["val_000000.bin", "train_000000.bin"]
    assert files(out) == {name: want[name] for name in good}


def test_fineweb_input_dir(tmp_path, rng):
    local, out = tmp_path / "downloaded", tmp_path / "out"
    local.mkdir()
    want = make_fineweb(local, rng)
    fineweb.main(["--input", str(local), "--out_dir", str(out), "--num_chunks", "2"])
    assert files(out) == want
    (local / "fineweb_train_000003.bin").write_bytes(want["train_000000.bin"][:-2])  # truncated
    with pytest.raises(ShardError, match="truncated"):
        fineweb.main(["--input", str(local), "--out_dir", str(out), "--num_chunks", "3", "--overwrite"])
    with pytest.raises(SystemExit, match="missing fineweb_train_000004.bin"):
        fineweb.main(["--input", str(local), "--out_dir", str(out), "--num_chunks", "4", "--overwrite"])


# --------------------------------------------------------------------------------------------------- TinyStories


def test_stories_split_across_read_blocks(tmp_path, rng):
    stories = make_stories(rng, 50) + ["naïve café — 東京 🙂 " * 20]
    write_stories(tmp_path / "s.txt", stories)
    # delimiters and multi-byte characters straddle the blocks
    assert list(iter_stories(tmp_path / "s.txt", block_bytes=97)) == [s.strip() for s in stories]


def test_parallel_tokenization_matches_single_process(rng):
    docs = make_stories(rng, 1000) + ["naïve café — 東京 🙂", "a"]
    want = tokenize_single_process(docs)
    assert (want == EOT).sum() == len(docs) and want[0] == EOT
    got = tokenize_documents(docs, workers=2)
    assert got.dtype == np.uint16 and np.array_equal(got, want)
    assert np.array_equal(np.concatenate(list(iter_tokens(docs, 2, docs_per_task=7))), want)  # order across tasks


def test_tinystories_download_and_decode(server, tmp_path, rng):
    train, val = make_stories(rng, 300), make_stories(rng, 30)
    write_stories(server.root / FILES["train"], train)
    write_stories(server.root / FILES["val"], val)
    out = tmp_path / "out"
    args = ["--base_url", server.url, "--out_dir", str(out), "--workers", "2", "--shard_size", "20000"]
    paths = tinystories.main(args)
    assert len(paths["train"]) > 1  # the stream spans shards
    assert read_docs(out, "train") == train and read_docs(out, "val") == val
    server.log.clear()
    tinystories.main(args + ["--overwrite"])
    assert server.log == []  # the text files are kept and not fetched again


def test_tinystories_single_input_holds_out_val(tmp_path, rng):
    stories = make_stories(rng, 200)
    write_stories(tmp_path / "s.txt", stories)
    out = tmp_path / "out"
    tinystories.main(["--input", str(tmp_path / "s.txt"), "--out_dir", str(out), "--workers", "2", "--val_every", "10"])
    assert read_docs(out, "val") == stories[::10]
    assert read_docs(out, "train") == [s for i, s in enumerate(stories) if i % 10]


# --------------------------------------------------------------------------------------------------- the CLIs


def test_scripts_run_from_the_command_line(server, tmp_path, rng):
    want = make_fineweb(server.root, rng, 1)
    out = tmp_path / "fineweb"
    cmd = [sys.executable, "data/fineweb10B/prepare.py", *fineweb_args(server, out, 1)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert files(out) == want

    train, val = make_stories(rng, 100), make_stories(rng, 10)
    write_stories(tmp_path / "train.txt", train)
    write_stories(tmp_path / "valid.txt", val)
    out = tmp_path / "tinystories"
    cmd = [sys.executable, "data/tinystories/prepare.py", "--input", str(tmp_path / "train.txt"),
           str(tmp_path / "valid.txt"), "--out_dir", str(out), "--workers", "2"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert read_docs(out, "train") == train and read_docs(out, "val") == val
