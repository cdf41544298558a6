"""Chat with a post-trained (SFT or DPO) model in the terminal: the KV cache, tokens printed as they come.

    python chat.py --out_dir=out-sft                                # interactive; Ctrl-D quits, /reset starts over
    python chat.py --out_dir=out-sft --prompt="What is 12 * 7?"     # answer one message and exit (scripts, tests)
    python chat.py --out_dir=out-sft --system="Answer briefly." --temperature=0

Every turn renders the whole conversation with the chat format (nanogpt/chat_format.py), prefills a cache with it and
samples until <|assistant_end|> or max_new_tokens. A conversation longer than the context keeps its last block_size
tokens; a reply that fills the cache (block_size positions) re-prefills the last 3/4 of the context and goes on.
Ids past the tokenizer's vocabulary (the model's padding rows) are never sampled. A base model, which has no chat
tokens, is refused: sample.py continues its text. Sampling is nanogpt/sampling.py's (the penalties count the reply's
own tokens); a stop string ends the reply before it.
"""
import sys
from typing import Literal

import torch

from configurator import at_least, configure, require
from nanogpt.chat_format import chat_tokens, render_prompt
from nanogpt.runtime import ATTN_IMPLS, DTYPE_SETTINGS, load_for_inference
from nanogpt.sampling import TextStream, params_from_settings, sampler

out_dir = "out-sft"            # the chat model (ckpt.pt, or a sharded run's newest step_N/)
prompt = ""                    # answer this one message and exit; '' = an interactive chat
system = ""                    # a system message that opens the conversation; '' = none
max_new_tokens = 512           # tokens per reply at most
temperature = 0.7              # 0 = greedy
top_k = 50                     # 0 = off
top_p = 1.0                    # nucleus sampling; 1.0 = off
min_p = 0.0                    # drop tokens below min_p x the top probability; 0.0 = off
repetition_penalty = 1.0       # > 1 discourages tokens already in the reply (CTRL); 1.0 = off
frequency_penalty = 0.0        # in [-2, 2]: logit -= this x times in the reply (OpenAI)
presence_penalty = 0.0         # in [-2, 2]: logit -= this once a token is in the reply (OpenAI)
stop = ""                      # a reply ends before this text; '' = none
seed = 1337                    # the sampling RNG
device = "auto"                # 'auto' (cuda, else cpu), 'cpu', 'cuda', 'xla'
dtype: Literal[DTYPE_SETTINGS] = "auto"  # 'auto': bfloat16 on CUDA and XLA, else float32
attn_impl: Literal[ATTN_IMPLS] = "auto"  # 'auto' = sdpa until the GPU check passes 'triton'


def check_settings(config):
    at_least(config, 1, "max_new_tokens")
    at_least(config, 0, "temperature", "top_k")
    require(0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}")


def sampling_params(config):
    """The sampling settings as SamplingParams, checked (one line for a bad one)."""
    try:
        return params_from_settings(config, max_new_tokens)
    except ValueError as e:
        require(False, str(e))


def end_of_reply_token(tokenizer):
    try:
        return chat_tokens(tokenizer)["assistant"][1]
    except ValueError as e:  # a base or character-level model
        raise SystemExit(f"{out_dir}: {e}. chat.py needs a post-trained chat model; continue this one's text with "
                         f"`python sample.py --out_dir={out_dir}`")


def reply_tokens(model, tokenizer, context, device, params):
    """Reply tokens after the ids `context`, one at a time, until <|assistant_end|> or max_tokens."""
    end_of_reply = end_of_reply_token(tokenizer)
    for token in model.generate_tokens(torch.tensor([context], device=device), params.max_tokens,
                                       sampler(params, 1, device), vocab_limit=tokenizer.vocab_size):
        if token.item() == end_of_reply:
            return
        yield token.item()


def stream_reply(model, tokenizer, device, autocast, messages, params):
    """Print the assistant's reply to messages as it is generated; return its text."""
    stream, reply = TextStream(tokenizer, params.stop), ""
    with torch.no_grad(), autocast:  # (inference_mode tensors are refused by XLA)
        for token in reply_tokens(model, tokenizer, render_prompt(tokenizer, messages), device, params):
            text, stopped = stream.push(token)
            print(text, end="", flush=True)
            reply += text
            if stopped:
                break
    text = stream.finish()
    print(text, flush=True)
    return reply + text


def opening():
    return [{"role": "system", "content": system}] if system else []


def chat(model, tokenizer, device, autocast, params):
    """Read a message, stream the reply, until Ctrl-D; /reset forgets the conversation."""
    print(f"{out_dir}: {model.num_params():,} parameters, {tokenizer.describe()}, context {model.config.block_size}. "
          "Ctrl-D quits, /reset starts over.", file=sys.stderr)
    messages = opening()
    while True:
        try:
            text = input("\nyou> ")
        except EOFError:
            print()
            return
        if text.strip() == "/reset":
            messages = opening()
        elif text.strip():
            messages.append({"role": "user", "content": text})
            print("bot> ", end="", flush=True)
            messages.append({"role": "assistant", "content": stream_reply(model, tokenizer, device, autocast,
                                                                          messages, params)})


def main():
    config = configure(globals())
    check_settings(config)
    params = sampling_params(config)
    model, tokenizer, _, dev, _, autocast = load_for_inference(out_dir, device, dtype, attn_impl)
    end_of_reply_token(tokenizer)  # refuse a base model before the first prompt
    torch.manual_seed(seed)
    try:
        if prompt:
            stream_reply(model, tokenizer, dev, autocast, opening() + [{"role": "user", "content": prompt}], params)
        else:
            chat(model, tokenizer, dev, autocast, params)
    except KeyboardInterrupt:
        print()


if __name__ == "__main__":
    main()
