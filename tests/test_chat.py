"""chat.py on tiny checkpoints: greedy replies equal a cache-free greedy decode, generation stops at
<|assistant_end|> or max_new_tokens, a multi-turn chat through stdin (with /reset and a prompt longer than the
context), and a base checkpoint refused with a pointer to sample.py."""
import os
import subprocess
import sys
from dataclasses import asdict

import torch
from conftest import ROOT, run_script

from model import GPT, GPTConfig
from nanogpt.chat_format import render_prompt
from nanogpt.checkpoint import save_checkpoint
from nanogpt.tokenizer import Tokenizer, chat_spec

ASSISTANT, ASSISTANT_END = 50261, 50262
HELLO, WORLD = 18435, 995  # " Hello", " world"
CHAT = Tokenizer(chat_spec())


def save(tmp_path, name, model, spec):
    out = tmp_path / name
    out.mkdir()
    save_checkpoint({"model": model.state_dict(), "model_args": asdict(model.config), "tokenizer": spec},
                    str(out / "ckpt.pt"))
    return str(out)


def chain_model(block_size=16, loop=False):
    """A model whose next token depends on the current one only (the blocks write nothing, so the final norm sees
    the token's embedding): <|assistant_start|> -> " Hello" -> " world" -> <|assistant_end|> (or back to " Hello")."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=50304, n_layer=1, n_embd=32, n_head=2))
    with torch.no_grad():
        for block in model.blocks:
            block.attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        model.wte.weight.zero_()
        model.lm_head.weight.zero_()
        for slot, (token, successor) in enumerate([(ASSISTANT, HELLO), (HELLO, WORLD),
                                                   (WORLD, HELLO if loop else ASSISTANT_END)]):
            model.wte.weight[token, slot] = 1.0
            model.lm_head.weight[successor, slot] = 1.0
    return model


def chat(out_dir, *args, stdin=None):
    """chat.py greedily on the CPU; stdin: the lines of an interactive session."""
    cmd = [sys.executable, os.path.join(ROOT, "chat.py"), f"--out_dir={out_dir}", "--device=cpu", "--temperature=0",
           *args]
    return subprocess.run(cmd, cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=300)


def test_prompt_reply_equals_greedy_decoding_without_cache(tmp_path, seed):
    model = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_embd=32, n_head=2, n_kv_head=1)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # spread the logits: no near-ties between the two decodes
    out_dir = save(tmp_path, "chat", model, chat_spec())
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    ids, reply = render_prompt(CHAT, messages), []
    with torch.no_grad():
        while len(reply) < 30:
            logits = model.logits(model(torch.tensor([ids]))[:, -1])
            logits[:, CHAT.vocab_size:] = float("-inf")
            token = int(logits.argmax())
            if token == ASSISTANT_END:
                break
            ids.append(token)
            reply.append(token)
    result = chat(out_dir, "--system=Be brief.", "--prompt=What is 2 + 2?", "--max_new_tokens=30")
    assert result.returncode == 0, result.stderr
    assert result.stdout == CHAT.decode(reply) + "\n"


def test_multi_turn_chat_stops_at_end_of_reply(tmp_path):
    out_dir = save(tmp_path, "chain", chain_model(block_size=16), chat_spec())
    long_message = "many words " * 20  # the conversation outgrows the 16-token context at once
    result = chat(out_dir, stdin=f"Hi\n/reset\n\n{long_message}\n")
    assert result.returncode == 0, result.stderr
    replies = [line.removeprefix("you> bot> ") for line in result.stdout.splitlines() if "bot> " in line]
    assert replies == [" Hello world"] * 2 and "Ctrl-D quits" in result.stderr


def test_max_new_tokens_through_cache_refills(tmp_path):
    out_dir = save(tmp_path, "loop", chain_model(block_size=16, loop=True), chat_spec())
    result = chat(out_dir, "--prompt=Hi", "--max_new_tokens=41")  # the 16-position cache refills twice
    assert result.returncode == 0, result.stderr
    assert result.stdout == " Hello world" * 20 + " Hello\n"


def test_base_checkpoint_is_refused(tmp_path):
    base = GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_embd=16, n_head=2))
    out_dir = save(tmp_path, "base", base, {"kind": "gpt2"})
    result = run_script("chat.py", f"--out_dir={out_dir}", "--prompt=Hi", "--device=cpu", check=False)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [  # one line, no traceback (the char-level case: test_chat_format)
        f"{out_dir}: its GPT-2 BPE tokenizer has no chat tokens (a base model's). chat.py needs a post-trained chat "
        f"model; continue this one's text with `python sample.py --out_dir={out_dir}`"]
