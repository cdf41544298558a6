"""serve.py with the real openai client, against a server started on 127.0.0.1 with a tiny chat model: completions
and chat equal a cache-free greedy decode, streaming equals the whole reply, stop strings, many clients at once
(every answer complete and its own), bad requests as OpenAI-format 4xx errors, a client that leaves mid-stream frees
its slot, a full queue is a 429, a base model refuses chat, and a port in use is one line."""
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict

import pytest
import requests
import torch
from conftest import ROOT, assert_one_clear_line, run_script

from model import GPT, GPTConfig
from nanogpt.chat_format import render_prompt
from nanogpt.checkpoint import save_checkpoint
from nanogpt.tokenizer import Tokenizer, chat_spec

openai = pytest.importorskip("openai", reason="test-only: pip install openai (CI installs it)")
pytest.importorskip("uvicorn", reason="serve.py's web stack: pip install starlette uvicorn (CI installs it)")
CHAT = Tokenizer(chat_spec())
ASSISTANT_END = 50262


def start_server(out_dir, *args):
    """serve.py on a free port; returns (process, base url) once it listens."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), f"--out_dir={out_dir}", "--port=0",
                             "--device=cpu", *args], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    if "serving" not in line:
        proc.kill()
        raise AssertionError(f"serve.py did not start: {line}{proc.stderr.read()[-3000:]}")
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # drain its log
    return proc, line.strip().rsplit(" ", 1)[-1]


def tiny_chat_model(block_size=512):
    """A random chat-tokenizer model: hybrid local/global layers with MQA (the engine's ring and masks are used)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=50304, n_layer=2, n_embd=32, n_head=2, n_kv_head=1,
                          attn_pattern="LG", local_window=8)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # spread the logits: no near-ties between batched and alone decoding
    return model


def save_run(tmp_path, model):
    out = tmp_path / "run"
    out.mkdir()
    save_checkpoint({"model": model.state_dict(), "model_args": asdict(model.config), "tokenizer": chat_spec()},
                    str(out / "ckpt.pt"))
    return str(out)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = tiny_chat_model()
    out_dir = save_run(tmp_path_factory.mktemp("serve"), model)
    proc, url = start_server(out_dir, "--slots=4", "--max_tokens_limit=1000", "--max_request_bytes=20000")
    yield model, url, openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    proc.terminate()
    proc.wait(timeout=30)


@torch.no_grad()
def greedy_reference(model, ids, max_tokens, stop_id):
    """Greedy reply ids by full forwards without a cache, ids past the tokenizer's vocabulary never chosen."""
    ids, out = list(ids), []
    while len(out) < max_tokens:
        logits = model.logits(model(torch.tensor([ids]))[:, -1])
        logits[:, CHAT.vocab_size:] = float("-inf")
        token = int(logits.argmax())
        if token == stop_id:
            break
        out.append(token)
        ids.append(token)
    return out


def chat_reference(model, messages, max_tokens):
    return CHAT.decode(greedy_reference(model, render_prompt(CHAT, messages), max_tokens, ASSISTANT_END))


def completion_reference(model, prompt, max_tokens):
    return CHAT.decode(greedy_reference(model, CHAT.encode(prompt), max_tokens, CHAT.eot))


def test_completions_and_chat_equal_greedy_decoding(served):
    model, url, client = served
    reply = client.completions.create(model="run", prompt="The quick brown fox", max_tokens=12, temperature=0)
    assert reply.choices[0].text == completion_reference(model, "The quick brown fox", 12)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 12
    assert reply.usage.prompt_tokens == len(CHAT.encode("The quick brown fox"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    reply = client.chat.completions.create(model="run", messages=messages, max_tokens=15, temperature=0)
    assert reply.choices[0].message.content == chat_reference(model, messages, 15)
    assert reply.choices[0].message.role == "assistant" and reply.object == "chat.completion"
    assert [m.id for m in client.models.list().data] == ["run"]
    assert requests.get(f"{url}/health").json()["status"] == "ok"


def test_streaming_gives_the_same_reply_piece_by_piece(served):
    model, _, client = served
    messages = [{"role": "user", "content": "Tell me a story."}]
    chunks = list(client.chat.completions.create(model="run", messages=messages, max_tokens=20, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == chat_reference(model, messages, 20)
    assert sum(bool(c.choices[0].delta.content) for c in chunks) > 5  # it came in pieces
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    pieces = list(client.completions.create(model="run", prompt="Once", max_tokens=10, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == completion_reference(model, "Once", 10)


def test_stop_strings_end_the_reply_before_them(served):
    model, _, client = served
    full = completion_reference(model, "Stop here", 30)
    stop = full[len(full) // 2:len(full) // 2 + 3]  # three characters from the middle of the greedy text
    expected = full[:full.find(stop)]
    for stream in (False, True):
        reply = client.completions.create(model="run", prompt="Stop here", max_tokens=30, temperature=0,
                                          stop=["\x00never", stop], stream=stream)
        if stream:
            reply = list(reply)
            text, finish = "".join(c.choices[0].text for c in reply), reply[-1].choices[0].finish_reason
        else:
            text, finish = reply.choices[0].text, reply.choices[0].finish_reason
        assert (text, finish) == (expected, "stop"), stream


def test_many_clients_at_once_each_get_their_own_complete_answer(served):
    model, url, client = served
    prompts = [f"Client {i} asks about {'cats dogs birds fish'.split()[i % 4]}" * (1 + i % 3) for i in range(12)]
    answers = [None] * len(prompts)

    def ask(i):  # more clients than slots: some wait for a slot; half stream
        messages = [{"role": "user", "content": prompts[i]}]
        if i % 2:
            chunks = client.chat.completions.create(model="run", messages=messages, max_tokens=8 + i,
                                                    temperature=0, stream=True)
            answers[i] = "".join(c.choices[0].delta.content or "" for c in chunks)
        else:
            answers[i] = client.chat.completions.create(model="run", messages=messages, max_tokens=8 + i,
                                                        temperature=0).choices[0].message.content
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i, prompt in enumerate(prompts):
        assert answers[i] == chat_reference(model, [{"role": "user", "content": prompt}], 8 + i), i
    assert requests.get(f"{url}/health").json()["running"] == 0


def test_bad_requests_get_4xx_errors_in_openai_format(served):
    _, url, client = served
    ok = dict(model="run", prompt="hi", max_tokens=2)
    for kwargs, needle in ((dict(temperature=-1), "temperature"), (dict(max_tokens=1001), "limit of 1000"),
                           (dict(n=2), "n and best_of"), (dict(extra_body={"colour": 1}), "does not support: colour"),
                           (dict(prompt="hi " * 600), "maximum context length is 512"),
                           (dict(stop=["a", "b", "c", "d", "e"]), "at most 4"), (dict(prompt=""), "prompt")):
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(**{**ok, **kwargs})
        assert needle in caught.value.body["message"], (kwargs, caught.value.body)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="run", messages=[{"role": "robot", "content": "x"}])
    assert "role must be one of" in caught.value.body["message"]
    for method, path, data, status in (("post", "/v1/completions", b"{not json", 400),
                                       ("post", "/v1/completions", b"[1, 2]", 400),
                                       ("post", "/v1/completions", b"{}", 400),
                                       ("post", "/v1/completions", b'{"prompt": "' + b"x" * 30000 + b'"}', 413),
                                       ("get", "/v1/completions", None, 405), ("get", "/v2/nothing", None, 404)):
        response = getattr(requests, method)(url + path, data=data)
        error = response.json()["error"]
        assert response.status_code == status and error["message"] and error["type"], (path, response.text)
    assert requests.get(f"{url}/health").json() | {"running": 0} == requests.get(f"{url}/health").json()


def test_a_client_that_leaves_mid_stream_frees_its_slot(served):
    _, url, _ = served
    before = requests.get(f"{url}/health").json()["cancelled"]
    with requests.post(f"{url}/v1/completions", json={"prompt": "Go on", "max_tokens": 1000, "stream": True},
                       stream=True) as response:
        assert next(response.iter_lines()).startswith(b"data: ")
    deadline = time.time() + 30
    while time.time() < deadline:  # the engine notices at its next step; the 500-token reply was far from done
        health = requests.get(f"{url}/health").json()
        if health["running"] == 0 and health["cancelled"] == before + 1:
            break
        time.sleep(0.05)
    assert (health["running"], health["cancelled"]) == (0, before + 1), health


def test_a_port_in_use_or_a_missing_checkpoint_is_one_line(served, tmp_path):
    _, url, _ = served
    port = url.rsplit(":", 1)[-1]
    result = run_script("serve.py", "--out_dir=nowhere", f"--port={port}", timeout=60, check=False)
    assert_one_clear_line(result, f"127.0.0.1:{port}", "--port")
    result = run_script("serve.py", f"--out_dir={tmp_path}", "--port=0", "--device=cpu", timeout=60, check=False)
    assert_one_clear_line(result, f"no checkpoint at {tmp_path}")


def test_a_full_queue_is_429_and_a_base_model_has_no_chat(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=4096, vocab_size=96, n_layer=1, n_embd=32, n_head=2))  # a reply of seconds
    out = tmp_path / "char"
    out.mkdir()
    save_checkpoint({"model": model.state_dict(), "model_args": asdict(model.config),
                     "tokenizer": {"kind": "char", "chars": "".join(map(chr, range(32, 127)))}}, str(out / "ckpt.pt"))
    proc, url = start_server(str(out), "--slots=1", "--max_waiting=0")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="char", messages=[{"role": "user", "content": "hi"}])
        assert "no chat format" in caught.value.body["message"]
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="char", prompt="caf\u00e9", max_tokens=2)
        assert "not in this model's vocabulary" in caught.value.body["message"]
        with requests.post(f"{url}/v1/completions", json={"prompt": "ab", "max_tokens": 4000, "stream": True},
                           stream=True) as busy:  # holds the one slot
            lines = busy.iter_lines()  # (kept: a dropped line iterator closes the connection)
            next(lines)
            with pytest.raises(openai.RateLimitError) as caught:
                client.completions.create(model="char", prompt="cd", max_tokens=2)
            assert "1 requests are running and 0 waiting" in caught.value.body["message"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
