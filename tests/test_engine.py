"""nanogpt/engine.py: continuous batching gives every request exactly the tokens it gets alone.

The reference is independent of any cache: greedy decoding by a full forward over the whole sequence at every step.
The models run in float64, so batching's different summation orders cannot flip an argmax. The configs cover the
cache's shapes: a sliding-window ring shorter than the prompts and the prefill chunks, cross-layer shared K/V
(kv_share=2 and share_global_kv), multi-query and grouped-query attention, value embeddings, and a
mixture-of-experts model (its routing is per token, so batching must not change it)."""
import random

import pytest
import torch

from model import GPT, GPTConfig
from nanogpt.engine import Engine
from nanogpt.sampling import SamplingParams

CONFIGS = {
    "hybrid-shared-mqa": dict(n_layer=4, n_head=4, n_kv_head=1, attn_pattern="LLG", local_window=5, kv_share=2,
                              share_global_kv=True, value_embeds=1),
    "hybrid-gqa": dict(n_layer=3, n_head=4, n_kv_head=2, attn_pattern="LG", local_window=3),
    "global-mha": dict(n_layer=2, n_head=2),
    "moe": dict(n_layer=2, n_head=2, n_kv_head=1, n_expert=4, n_expert_active=2, n_dense_layers=1),
    "mla-hybrid": dict(n_layer=2, n_head=2, kv_lora_rank=16, qk_norm=False, attn_pattern="LG", local_window=4),
}
VOCAB, BLOCK = 97, 40


def tiny_model(name):
    model = GPT(GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_embd=32, **CONFIGS[name])).double().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10)  # spread the logits: greedy must follow the model, not noise
    return model


@torch.no_grad()
def greedy_alone(model, prompt, max_tokens, stop_id=None):
    """Greedy tokens after prompt by full forwards without a cache (the stop id ends them and is not included)."""
    ids, out = list(prompt), []
    while len(out) < max_tokens and len(ids) <= BLOCK:
        token = int(model.logits(model(torch.tensor([ids]))[:, -1]).argmax())
        if token == stop_id:
            break
        out.append(token)
        ids.append(token)
    return out


def random_request(rng):
    """Prompts from one token to the whole context, some longer than the ring and several prefill chunks."""
    prompt = [rng.randrange(VOCAB) for _ in range(rng.choice([1, 2, rng.randint(3, 30), BLOCK - 1, BLOCK]))]
    return prompt, rng.randint(1, 12)


@pytest.mark.parametrize("name", CONFIGS)
def test_interleaved_requests_get_the_tokens_they_get_alone(name, seed):
    model, rng = tiny_model(name), random.Random(seed)
    stop_id = rng.randrange(VOCAB)
    engine = Engine(model, slots=3, prefill_chunk=rng.choice([1, 4, 7]))
    pending = [random_request(rng) for _ in range(10)]
    seqs, cancelled, steps = [], [], 0
    while pending or engine.busy():
        if pending and rng.random() < 0.7:  # a request joins between most steps, sometimes several
            for _ in range(rng.choice([1, 1, 2])):
                if pending:
                    prompt, n = pending.pop()
                    seqs.append(engine.add(prompt, SamplingParams(temperature=0, max_tokens=n), stop_ids={stop_id}))
        if engine.running and rng.random() < 0.1:  # and now and then a client leaves mid-reply
            victim = rng.choice(engine.running)
            engine.cancel(victim)
            cancelled.append(victim)
        engine.step()
        steps += 1
    assert steps > 10 and len(engine.free) == 3
    for seq in seqs:
        expected = greedy_alone(model, seq.prompt, seq.params.max_tokens, stop_id)
        if seq in cancelled:
            assert seq.finish_reason == "cancelled" and seq.generated == expected[:len(seq.generated)]
            continue
        assert seq.generated == expected, (len(seq.prompt), seq.params.max_tokens)
        ended_by_stop = len(expected) < seq.params.max_tokens and len(seq.prompt) + len(expected) <= BLOCK
        assert seq.finish_reason == ("stop" if ended_by_stop else "length")


def test_seeded_sampling_is_the_same_batched_or_alone(seed):
    model, rng = tiny_model("hybrid-shared-mqa"), random.Random(seed)
    requests = [(random_request(rng)[0], SamplingParams(temperature=1.0, top_k=20, max_tokens=8, seed=seed + i))
                for i in range(6)]
    alone = [Engine(model, slots=1).run([request])[0] for request in requests]
    assert Engine(model, slots=6, prefill_chunk=5).run(requests) == alone
    assert len({tuple(tokens) for tokens in alone}) > 1  # the seeds differ: so do the draws


def test_the_context_ends_a_reply_and_bad_prompts_are_refused():
    model = tiny_model("global-mha")
    engine = Engine(model, slots=2)
    full = engine.add(list(range(BLOCK)), SamplingParams(temperature=0, max_tokens=5))
    near = engine.add(list(range(BLOCK - 2)), SamplingParams(temperature=0, max_tokens=5))
    while engine.busy():
        engine.step()
    assert (len(full.generated), full.finish_reason) == (1, "length")  # its first token needs no cache position
    assert (len(near.generated), near.finish_reason) == (3, "length")
    for prompt, needle in (([], "1 to 40"), (list(range(BLOCK + 1)), "41 tokens")):
        with pytest.raises(ValueError, match=needle):
            engine.add(prompt, SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        engine.add([1], SamplingParams(top_p=0))
