"""Sample from a trained model with the KV cache.

    python sample.py                                    # from out/ckpt.pt
    python sample.py --out_dir=out-x --start="ROMEO:" --num_samples=3 --max_new_tokens=200
    python sample.py --start=FILE:prompt.txt --temperature=0.8 --top_p=0.95 --stop="\n\n"

The sampling settings are nanogpt/sampling.py's (docs/model.md#sampling): penalties on the raw logits, then the
temperature, then top-k, top-p and min-p.
"""
import time
from typing import Literal

import torch

from configurator import at_least, configure, require
from model import KVCache
from nanogpt.files import FileFormatError, read_text
from nanogpt.runtime import ATTN_IMPLS, DTYPE_SETTINGS, load_for_inference
from nanogpt.sampling import first_stop, params_from_settings, sampler

out_dir = "out"                # the checkpoint to sample (ckpt.pt, or a sharded run's newest step_N/)
start = "\n"                   # prompt text, or FILE:path to read it from a file
num_samples = 3                # sequences, sampled as one batch
max_new_tokens = 500           # tokens generated per sequence
temperature = 0.8              # 0 = greedy
top_k = 200                    # 0 = off
top_p = 1.0                    # nucleus sampling; 1.0 = off
min_p = 0.0                    # drop tokens below min_p x the top probability; 0.0 = off
repetition_penalty = 1.0       # > 1 discourages tokens already generated (CTRL); 1.0 = off
frequency_penalty = 0.0        # in [-2, 2]: logit -= this x times generated (OpenAI)
presence_penalty = 0.0         # in [-2, 2]: logit -= this once a token was generated (OpenAI)
stop = ""                      # each sample ends before this text; '' = none
seed = 1337
speculative = False            # an MTP model, greedy: its MTP modules draft, the model verifies (same tokens)
device = "auto"                # 'auto' (cuda, else cpu), 'cpu', 'cuda', 'xla' (each new cache length compiles a graph)
dtype: Literal[DTYPE_SETTINGS] = "auto"  # 'auto': bfloat16 on CUDA and XLA, else float32
attn_impl: Literal[ATTN_IMPLS] = "auto"  # 'auto' = sdpa until the GPU check passes 'triton'


def check_settings(config):
    at_least(config, 1, "num_samples", "max_new_tokens")
    at_least(config, 0, "temperature", "top_k")
    require(0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}")
    require(not speculative or temperature == 0, "--speculative=True decodes greedily: add --temperature=0")


def generate_speculative(model, x, tokenizer):
    """Each sequence on its own (acceptance differs per sequence); prints the drafts accepted."""
    rows, accepted, proposed, steps = [], 0, 0, 0
    for row in x.split(1):
        rows.append([])
        for tokens, (ok, n) in model.generate_speculative(row, max_new_tokens, vocab_limit=tokenizer.vocab_size):
            rows[-1] += tokens[0].tolist()
            accepted, proposed, steps = accepted + ok, proposed + n, steps + 1
    print(f"speculative: {accepted}/{proposed} drafts accepted ({accepted / max(proposed, 1):.1%}), "
          f"{num_samples * max_new_tokens / steps:.2f} tokens per forward")
    return rows


def sampling_params(config):
    """The sampling settings as SamplingParams, checked (one line for a bad one)."""
    try:
        return params_from_settings(config, max_new_tokens)
    except ValueError as e:
        require(False, str(e))


def generate(model, x, params, tokenizer):
    """The sampled ids of each row of x; with stop strings, until every row holds one."""
    rows = [[] for _ in range(x.size(0))]
    sample = sampler(params, x.size(0), x.device)
    for token in model.generate_tokens(x, params.max_tokens, sample, vocab_limit=tokenizer.vocab_size):
        for row, t in zip(rows, token[:, 0].tolist()):
            row.append(t)
        if params.stop and all(first_stop(tokenizer.decode(row), params.stop) >= 0 for row in rows):
            break
    return rows


def sample_text(tokenizer, prompt, row, stop):
    """The prompt and its sample as text, the sample cut before its first stop string."""
    if not stop:
        return tokenizer.decode(prompt + row)
    text = tokenizer.decode(row)
    cut = first_stop(text, stop)
    return tokenizer.decode(prompt) + (text[:cut] if cut >= 0 else text)


def prompt_ids(tokenizer):
    """The prompt's token ids: --start's text, or the file it names after FILE:."""
    text = start
    if start.startswith("FILE:"):
        try:
            text = read_text(start[5:])
        except (OSError, FileFormatError) as e:
            raise SystemExit(f"--start=FILE:{start[5:]}: cannot read the prompt file ({e})")
    try:
        ids = tokenizer.encode(text)
    except ValueError as e:  # a character-level model meets a character it never saw
        raise SystemExit(f"--start: {e}")
    if not ids:
        raise SystemExit("the prompt encodes to no tokens: give --start some text")
    return ids


def main():
    config = configure(globals())
    check_settings(config)
    params = sampling_params(config)
    model, tokenizer, _, dev, ptdtype, autocast = load_for_inference(out_dir, device, dtype, attn_impl)
    torch.manual_seed(seed)
    ids = prompt_ids(tokenizer)
    x = torch.tensor(ids, dtype=torch.long, device=dev)[None].repeat(num_samples, 1)
    with torch.no_grad(), autocast:  # (inference_mode tensors are refused by XLA)
        t0 = time.time()
        if speculative:
            if not model.config.mtp_depth:
                raise SystemExit(f"--speculative=True needs a model trained with MTP; {out_dir} has mtp_depth=0")
            rows = generate_speculative(model, x, tokenizer)
        else:
            rows = generate(model, x, params, tokenizer)
        dt = time.time() - t0
    for row in rows:
        print(sample_text(tokenizer, ids, row, params.stop))
        print("---------------")
    cfg = model.config
    full = KVCache.bytes_at(cfg, cfg.block_size, torch.finfo(ptdtype).bits // 8)  # a cache's bytes per sequence
    print(f"{num_samples * len(rows[0]) / dt:,.1f} tokens/s; KV cache {full / cfg.block_size:,.0f} bytes/token "
          f"(per sequence, averaged over a full {cfg.block_size}-token context), {full * num_samples / 2**20:.2f} "
          f"MiB allocated for {num_samples} sequences")


if __name__ == "__main__":
    main()
