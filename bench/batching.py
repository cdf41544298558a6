"""Continuous batching on the CPU: aggregate tokens/s of N concurrent requests in one Engine (nanogpt/engine.py)
against the same N requests one after another through model.generate_tokens (the single-sequence KV-cache loop
sample.py and chat.py run), printed as a markdown table.

    python bench/batching.py                                 # N = 1, 4, 16 on the quick run's shape (random weights)
    python bench/batching.py --layers 6 --width 384 --heads 6 --block 256 --mlp swiglu   # nanoGPT's Shakespeare GPU shape
    python bench/batching.py --concurrency 1 4 16 32 --prompt 64 --new 128 --repeats 5

Each repeat times the sequential run and the batched run back to back (paired: both see the same machine load) and
the table shows medians over repeats: tokens/s of each and the median of the per-pair ratios. A last line gives
the ceiling: how much more one decode step of N rows costs than one of a single row, in model.KVCache. Every request
generates exactly --new tokens (greedy, no stop), so both sides produce the same token count; the batched side also
prefills the prompts (in --chunk token chunks) inside its time, as a server would.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GPT, GPTConfig, KVCache  # noqa: E402
from nanogpt.engine import Engine  # noqa: E402
from nanogpt.sampling import SamplingParams  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="requests at once (default 1 4 16)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per request")
    p.add_argument("--new", type=int, default=64, help="generated tokens per request")
    p.add_argument("--chunk", type=int, default=64, help="the engine's prefill chunk")
    p.add_argument("--repeats", type=int, default=3, help="paired runs per concurrency (medians reported)")
    p.add_argument("--layers", type=int, default=4, help="the model (default: train.py's quick run)")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--vocab", type=int, default=65)
    p.add_argument("--mlp", choices=("relu2", "swiglu"), default="relu2")
    args = p.parse_args()
    if min(args.concurrency + [args.prompt, args.new, args.chunk, args.repeats]) < 1:
        p.error("--concurrency, --prompt, --new, --chunk and --repeats must be >= 1")
    if args.prompt + args.new > args.block:
        p.error(f"--prompt + --new ({args.prompt + args.new}) must fit in --block ({args.block})")
    return args


def sequential(model, prompts, new):
    for prompt in prompts:
        for _ in model.generate_tokens(torch.tensor([prompt]), new):
            pass


def batched(model, prompts, new, chunk):
    engine = Engine(model, slots=len(prompts), prefill_chunk=chunk)
    outputs = engine.run([(prompt, SamplingParams(temperature=0, max_tokens=new)) for prompt in prompts])
    assert all(len(o) == new for o in outputs)


def decode_step_cost(model, rows, prompt, steps=20):
    """Seconds per decode step of `rows` sequences at once in model.KVCache (all at one position): how the model's
    own step cost grows with the batch, the ceiling on what batching can gain on this machine."""
    cache = KVCache(model.config)
    model(torch.zeros(rows, prompt, dtype=torch.long), cache=cache)
    token = torch.zeros(rows, 1, dtype=torch.long)
    start = time.perf_counter()
    for _ in range(steps):
        model.logits(model(token, cache=cache)[:, -1])
    return (time.perf_counter() - start) / steps


def timed(fn, *args):
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main():
    args = parse_args()
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=args.layers, n_embd=args.width, n_head=args.heads, block_size=args.block,
                    vocab_size=args.vocab, mlp=args.mlp)
    model = GPT(cfg).eval()
    print(f"model: {args.layers} layers, width {args.width}, {args.heads} heads, {args.mlp}, context {args.block} "
          f"({model.num_params() / 1e6:.1f}M parameters, random weights); prompts {args.prompt} tokens, "
          f"{args.new} new tokens each; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    with torch.no_grad():
        batched(model, [[0] * args.prompt] * 2, 4, args.chunk)  # warm up both paths
        sequential(model, [[0] * args.prompt], 4)
    print("\n| concurrent requests | one after another (tok/s) | batched (tok/s) | speedup (median of pairs) |")
    print("|---:|---:|---:|---:|")
    for n in args.concurrency:
        prompts = [torch.randint(args.vocab, (args.prompt,)).tolist() for _ in range(n)]
        tokens, seq_rates, batch_rates, ratios = n * args.new, [], [], []
        for _ in range(args.repeats):
            with torch.no_grad():
                t_seq = timed(sequential, model, prompts, args.new)
                t_batch = timed(batched, model, prompts, args.new, args.chunk)
            seq_rates.append(tokens / t_seq)
            batch_rates.append(tokens / t_batch)
            ratios.append(t_seq / t_batch)
        print(f"| {n} | {statistics.median(seq_rates):.0f} | {statistics.median(batch_rates):.0f} | "
              f"{statistics.median(ratios):.2f}x |", flush=True)
    n = max(args.concurrency)
    with torch.no_grad():
        costs = [(decode_step_cost(model, n, args.prompt), decode_step_cost(model, 1, args.prompt))
                 for _ in range(args.repeats)]
    grows = statistics.median(many / one for many, one in costs)
    print(f"\nthe model's own decode step (model.KVCache, no engine): {n} rows cost {grows:.1f}x one row, so batching "
          f"{n} decodes can gain at most {n / grows:.1f}x here (median of {args.repeats} paired measurements)")


if __name__ == "__main__":
    main()
