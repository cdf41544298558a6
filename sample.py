"""Sample from a trained model with the KV cache.

    python sample.py                                    # from out/ckpt.pt
    python sample.py --out_dir=out-x --start="ROMEO:" --num_samples=3 --max_new_tokens=200
    python sample.py --start=FILE:prompt.txt --temperature=0.8 --top_p=0.95
"""
import time
from typing import Literal

import torch

from configurator import at_least, configure, require
from model import KVCache
from nanogpt.files import FileFormatError, read_text
from nanogpt.runtime import ATTN_IMPLS, DTYPE_SETTINGS, load_for_inference

out_dir = "out"                # the checkpoint to sample (ckpt.pt, or a sharded run's newest step_N/)
start = "\n"                   # prompt text, or FILE:path to read it from a file
num_samples = 3                # sequences, sampled as one batch
max_new_tokens = 500           # tokens generated per sequence
temperature = 0.8              # 0 = greedy
top_k = 200                    # 0 = off
top_p = 1.0                    # nucleus sampling; 1.0 = off
seed = 1337
speculative = False            # an MTP model, greedy: its MTP modules draft, the model verifies (same tokens)
device = "auto"                # 'auto' (cuda, else cpu), 'cpu', 'cuda', 'xla' (each new cache length compiles a graph)
dtype: Literal[DTYPE_SETTINGS] = "auto"  # 'auto': bfloat16 on CUDA and XLA, else float32
attn_impl: Literal[ATTN_IMPLS] = "auto"  # 'auto' (triton on CUDA, sdpa elsewhere)


def check_settings(config):
    at_least(config, 1, "num_samples", "max_new_tokens")
    at_least(config, 0, "temperature", "top_k")
    require(0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}")
    require(not speculative or temperature == 0, "--speculative=True decodes greedily: add --temperature=0")


def generate_speculative(model, x, tokenizer):
    """Each sequence on its own (acceptance differs per sequence); prints the drafts accepted."""
    rows, accepted, proposed, steps = [], 0, 0, 0
    for row in x.split(1):
        out = [row]
        for tokens, (ok, n) in model.generate_speculative(row, max_new_tokens, vocab_limit=tokenizer.vocab_size):
            out.append(tokens)
            accepted, proposed, steps = accepted + ok, proposed + n, steps + 1
        rows.append(torch.cat(out, dim=1))
    print(f"speculative: {accepted}/{proposed} drafts accepted ({accepted / max(proposed, 1):.1%}), "
          f"{num_samples * max_new_tokens / steps:.2f} tokens per forward")
    return torch.cat(rows)


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
    check_settings(configure(globals()))
    model, tokenizer, _, dev, ptdtype, autocast = load_for_inference(out_dir, device, dtype, attn_impl)
    torch.manual_seed(seed)
    x = torch.tensor(prompt_ids(tokenizer), dtype=torch.long, device=dev)[None].repeat(num_samples, 1)
    with torch.no_grad(), autocast:  # (inference_mode tensors are refused by XLA)
        t0 = time.time()
        if speculative:
            if not model.config.mtp_depth:
                raise SystemExit(f"--speculative=True needs a model trained with MTP; {out_dir} has mtp_depth=0")
            y = generate_speculative(model, x, tokenizer)
        else:
            y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k or None, top_p=top_p,
                               vocab_limit=tokenizer.vocab_size)
        dt = time.time() - t0
    for row in y.tolist():
        print(tokenizer.decode(row))
        print("---------------")
    cfg = model.config
    full = KVCache.bytes_at(cfg, cfg.block_size, torch.finfo(ptdtype).bits // 8)  # a cache's bytes per sequence
    print(f"{num_samples * max_new_tokens / dt:,.1f} tokens/s; KV cache {full / cfg.block_size:,.0f} bytes/token "
          f"(per sequence, averaged over a full {cfg.block_size}-token context), {full * num_samples / 2**20:.2f} "
          f"MiB allocated for {num_samples} sequences")


if __name__ == "__main__":
    main()
