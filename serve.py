"""Serve a model over HTTP with the OpenAI API, many requests decoded in one batch (nanogpt/engine.py).

    python serve.py --out_dir=out-sft                     # http://127.0.0.1:8000: a chat page at /, the API at /v1
    python serve.py --out_dir=out --host=0.0.0.0 --port=8080 --slots=32

Endpoints: POST /v1/completions (a prompt string) and /v1/chat/completions (messages rendered with the checkpoint's
chat format, nanogpt/chat_format.py; a base model has none and gets a 400), both with "stream": true for server-sent
events; GET /v1/models, /health (the load) and / (nanogpt/chat_page.html). Sampling fields: OpenAI's temperature,
top_p, max_tokens (max_completion_tokens), stop, seed, frequency_penalty, presence_penalty, and top_k, min_p,
repetition_penalty as extras (nanogpt/sampling.py). A reply ends at max_tokens, a stop string, the end of reply
(<|assistant_end|> in a chat, <|endoftext|> in a completion) or the context (block_size; finish_reason "length").

Limits: `slots` requests decode together, `max_waiting` more queue for a slot (then 429), max_tokens at most
`max_tokens_limit`, a prompt at most the context (400, code context_length_exceeded), a body at most
`max_request_bytes` (413). Every bad request gets a 4xx JSON error in OpenAI's format. A client that disconnects
frees its slot at the next step. The web stack is Starlette + uvicorn (optional: `pip install starlette uvicorn`).
"""
import asyncio
import json
import os
import socket
import sys
import time
import uuid
from typing import Literal

from configurator import at_least, configure, require
from nanogpt.chat_format import chat_tokens, render_prompt
from nanogpt.runtime import ATTN_IMPLS, DTYPE_SETTINGS, load_for_inference
from nanogpt.sampling import SamplingParams, TextStream

out_dir = "out-sft"            # the model (ckpt.pt, or a sharded run's newest step_N/)
host = "127.0.0.1"             # the address to listen on; 0.0.0.0 serves other machines too (there is no auth)
port = 8000                    # 0 = any free port (printed)
model_name = ""                # the model id in /v1/models and responses; '' = out_dir's folder name
slots = 16                     # requests decoded together in one batch
prefill_chunk = 64             # prompt tokens prefilled per engine step (long prompts do not stall the others)
max_waiting = 64               # requests queued for a slot at most; more get 429
max_tokens_limit = 4096        # the most tokens a request may ask for
default_max_tokens = 256       # when a request does not say
max_request_bytes = 1_000_000  # the largest request body
device = "auto"                # 'auto' (cuda, else cpu), 'cpu', 'cuda'
dtype: Literal[DTYPE_SETTINGS] = "auto"  # 'auto': bfloat16 on CUDA, else float32
attn_impl: Literal[ATTN_IMPLS] = "auto"  # the engine's batched rows attend through sdpa with a mask

CHAT_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nanogpt", "chat_page.html")
# OpenAI request fields -> SamplingParams fields (the rest are refused unless listed in IGNORED)
SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                   "repetition_penalty": "repetition_penalty", "frequency_penalty": "frequency_penalty",
                   "presence_penalty": "presence_penalty", "seed": "seed", "stop": "stop",
                   "max_tokens": "max_tokens", "max_completion_tokens": "max_tokens"}
IGNORED = {"model", "user", "stream_options", "n", "logprobs", "echo", "suffix", "best_of", "logit_bias",
           "top_logprobs", "metadata", "store"}


class RequestError(Exception):
    """A request we refuse: its HTTP status, OpenAI error type and code."""

    def __init__(self, message, status=400, code=None, param=None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


def error_body(message, status, code=None, param=None):
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ------------------------------------------------------------------------------------------------- reading requests

def refuse_unsupported(body):
    """OpenAI options this server cannot honour are refused by name, not silently dropped."""
    if body.get("n") not in (None, 1) or body.get("best_of") not in (None, 1):
        raise RequestError("n and best_of must be 1: one choice per request", param="n")
    if body.get("echo") or body.get("logprobs") or body.get("suffix") or body.get("logit_bias"):
        raise RequestError("echo, logprobs, suffix and logit_bias are not supported")
    known = set(SAMPLING_FIELDS) | IGNORED | {"prompt", "messages", "stream"}
    unknown = sorted(k for k, v in body.items() if k not in known and v is not None)  # null = not given
    if unknown:
        raise RequestError(f"field(s) this server does not support: {', '.join(unknown)}", param=unknown[0])


def sampling_params(body):
    """SamplingParams from a request's fields, checked; a RequestError names the bad one."""
    values = {SAMPLING_FIELDS[k]: v for k, v in body.items() if k in SAMPLING_FIELDS and v is not None}
    values.setdefault("max_tokens", default_max_tokens)
    stop = values.get("stop", [])
    if not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise RequestError("stop must be a string or a list of strings", param="stop")
    if isinstance(stop, list) and len(stop) > 4:
        raise RequestError("stop takes at most 4 strings", param="stop")
    params = SamplingParams(**values)
    try:
        params.check()
    except ValueError as e:
        raise RequestError(str(e)) from None
    if params.max_tokens > max_tokens_limit:
        raise RequestError(f"max_tokens {params.max_tokens} is over this server's limit of {max_tokens_limit}",
                           param="max_tokens")
    return params


def prompt_ids(body, tokenizer, chat):
    """The prompt's token ids and the ids that end the reply; a RequestError for a malformed prompt."""
    if chat:
        try:
            return render_prompt(tokenizer, body.get("messages")), {chat_tokens(tokenizer)["assistant"][1]}
        except ValueError as e:
            raise RequestError(str(e), param="messages") from None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("prompt must be one non-empty string", param="prompt")
    try:
        ids = tokenizer.encode(prompt)
    except ValueError as e:  # e.g. a character outside a character-level vocabulary
        raise RequestError(str(e), param="prompt") from None
    return ids, {tokenizer.eot} if tokenizer.eot is not None else set()


# ---------------------------------------------------------------------------------------------------- the server

class Server:
    def __init__(self, engine_thread, tokenizer, name, block_size):
        self.engine, self.tokenizer, self.name, self.block_size = engine_thread, tokenizer, name, block_size
        try:
            chat_tokens(tokenizer)
            self.has_chat = True
        except ValueError as e:
            self.has_chat, self.no_chat_reason = False, str(e)

    def check(self, body, chat):
        """A request's (prompt ids, sampling params, ids that end the reply); a RequestError if it is refused."""
        refuse_unsupported(body)
        if chat and not self.has_chat:
            raise RequestError(f"this model has no chat format ({self.no_chat_reason}): use /v1/completions")
        params = sampling_params(body)
        ids, stop_ids = prompt_ids(body, self.tokenizer, chat)
        if len(ids) > self.block_size:
            raise RequestError(f"This model's maximum context length is {self.block_size} tokens; the prompt has "
                               f"{len(ids)}", code="context_length_exceeded", param="messages" if chat else "prompt")
        if sum(self.engine.load()) >= slots + max_waiting:
            raise RequestError(f"{slots} requests are running and {max_waiting} waiting: retry later", status=429)
        return ids, params, stop_ids

    async def pieces(self, job, request, generated):
        """Run a checked request: (text, None) pieces of the reply as they come, then (None, finish_reason). Stop
        strings end it early; a client that went away cancels it (its slot frees at the next step). It is queued
        only once this generator runs: a stream whose client left before it began never takes a slot. generated
        gets the reply's token ids."""
        ids, params, stop_ids = job
        events, loop = asyncio.Queue(), asyncio.get_running_loop()
        seq = self.engine.submit(ids, params, lambda *e: loop.call_soon_threadsafe(events.put_nowait, e), stop_ids)
        stream = TextStream(self.tokenizer, params.stop)
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(events.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if kind == "token":
                    generated.append(value)
                    text, stopped = stream.push(value)
                    if text:
                        yield text, None
                    if stopped:
                        yield None, "stop"
                        return
                elif kind == "end":
                    tail = stream.finish()
                    if tail:
                        yield tail, None
                    yield None, "stop" if value == "stop" else "length"
                    return
                else:
                    raise RuntimeError(value)
        finally:
            self.engine.cancel(seq)  # a no-op once it has ended

    def envelope(self, chat, rid, choice, chunk=False):
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
        return {"id": rid, "object": kind, "created": int(time.time()), "model": self.name, "choices": [choice]}

    async def complete(self, request, chat):
        from starlette.responses import JSONResponse, StreamingResponse
        body = await read_json(request)
        job = self.check(body, chat)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if body.get("stream"):
            return StreamingResponse(self.sse(job, request, chat, rid), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        text, finish, generated = [], None, []
        async for piece, finish in self.pieces(job, request, generated):
            if piece:
                text.append(piece)
        text = "".join(text)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat
                  else {"index": 0, "text": text, "logprobs": None})
        n_prompt = len(job[0])
        usage = {"prompt_tokens": n_prompt, "completion_tokens": len(generated),
                 "total_tokens": n_prompt + len(generated)}
        return JSONResponse({**self.envelope(chat, rid, {**choice, "finish_reason": finish}), "usage": usage})

    async def sse(self, job, request, chat, rid):
        def event(piece, finish, first=False):
            delta = {"role": "assistant", "content": ""} if first else ({"content": piece} if piece else {})
            choice = ({"index": 0, "delta": delta} if chat else {"index": 0, "text": piece or "", "logprobs": None})
            return f"data: {json.dumps(self.envelope(chat, rid, {**choice, 'finish_reason': finish}, True))}\n\n"
        if chat:
            yield event(None, None, first=True)
        async for piece, finish in self.pieces(job, request, []):
            yield event(piece, finish)
        yield "data: [DONE]\n\n"

    def health(self):
        running, waiting = self.engine.load()
        return {"status": "ok", "model": self.name, "slots": slots, "running": running, "waiting": waiting,
                "cancelled": self.engine.cancelled, "context": self.block_size}

    def models(self):
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": "nanogpt"}]}


async def read_json(request):
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_request_bytes:
        raise RequestError(f"the request body is over {max_request_bytes} bytes", status=413)
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > max_request_bytes:
            raise RequestError(f"the request body is over {max_request_bytes} bytes", status=413)
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    return body


def build_app(server):
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    def json_error(message, status, code=None, param=None):
        return JSONResponse(error_body(message, status, code, param), status_code=status)

    async def refused(request, e):
        return json_error(str(e), e.status, e.code, e.param)

    async def http_error(request, e):  # 404, 405 and the like, in the same format
        return json_error(f"{request.method} {request.url.path}: {e.detail}", e.status_code)

    async def failed(request, e):
        return json_error(f"internal error: {type(e).__name__}: {e}", 500)

    with open(CHAT_PAGE, encoding="utf-8") as f:
        chat_page = f.read()

    async def page(request):
        return HTMLResponse(chat_page)

    async def health(request):
        return JSONResponse(server.health())

    async def models(request):
        return JSONResponse(server.models())

    async def completions(request):
        return await server.complete(request, chat=False)

    async def chat_completions(request):
        return await server.complete(request, chat=True)

    routes = [Route("/", page), Route("/health", health), Route("/v1/models", models),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={RequestError: refused, HTTPException: http_error,
                                                         Exception: failed})


def check_settings(config):
    at_least(config, 1, "slots", "prefill_chunk", "max_tokens_limit", "default_max_tokens", "max_request_bytes")
    at_least(config, 0, "max_waiting", "port")
    require(port <= 65535, f"port must be in [0, 65535], got {port}")


def listen(host, port):
    """A socket bound to host:port, or one line saying the port is taken (before the model loads)."""
    try:
        sock = socket.create_server((host, port))
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise SystemExit(f"serve.py: cannot listen on {host}:{port} ({reason}): stop what uses it or pass another "
                         "--port")
    return sock


def main():
    check_settings(configure(globals()))
    try:
        import uvicorn
    except ImportError:
        raise SystemExit("serve.py needs the optional web stack: pip install starlette uvicorn")
    from nanogpt.engine import Engine, EngineThread
    sock = listen(host, port)
    model, tokenizer, _, _, _, autocast = load_for_inference(out_dir, device, dtype, attn_impl)
    engine = Engine(model, slots, prefill_chunk, vocab_limit=tokenizer.vocab_size, autocast=autocast)
    name = model_name or os.path.basename(os.path.normpath(out_dir))
    server = Server(EngineThread(engine), tokenizer, name, model.config.block_size)
    bound = sock.getsockname()[1]
    print(f"serving {name} ({model.num_params():,} parameters, context {model.config.block_size}, {slots} slots) "
          f"on http://{host}:{bound}", file=sys.stderr, flush=True)
    config = uvicorn.Config(build_app(server), log_level="warning", timeout_graceful_shutdown=1)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
