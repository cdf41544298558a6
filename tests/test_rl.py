"""RL from verifiable rewards (nanogpt/rl.py): the advantages, each loss type, clipping and the k3 KL against hand
computations, pass@k against counting, the verifier, exact resume of the prompt stream and sampler, the loss
normalised over two gloo ranks equal to one process's, and a tiny policy whose reward RL must raise."""
import itertools
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from model import GPT, GPTConfig
from nanogpt import rl
from nanogpt.tokenizer import Tokenizer, chat_spec

# ------------------------------------------------------------------------------------------------- the math


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    std0 = math.sqrt(4 * 0.25 / 3)  # unbiased: sum of squared deviations (4 x 0.5^2) / (n - 1)
    std2 = math.sqrt((3 * 0.25 ** 2 + 0.75 ** 2) / 3)
    adv, equal = rl.group_advantages(rewards, "group")
    assert adv[0].tolist() == pytest.approx([0.5 / (std0 + 1e-4), -0.5 / (std0 + 1e-4)] * 1 + [-0.5 / (std0 + 1e-4),
                                                                                             0.5 / (std0 + 1e-4)])
    assert adv[1].tolist() == [0.0] * 4  # all equal: no gradient, counted
    assert adv[2].tolist() == pytest.approx([-0.25 / (std2 + 1e-4)] * 3 + [0.75 / (std2 + 1e-4)])
    assert equal.tolist() == [False, True, False]
    none, _ = rl.group_advantages(rewards, "none")
    assert none[2].tolist() == pytest.approx([-0.25, -0.25, -0.25, 0.75])
    flat = rewards.flatten()
    batch_std = math.sqrt(((flat - flat.mean()) ** 2).sum().item() / 11)
    batch, _ = rl.group_advantages(rewards, "batch")
    assert batch[0, 0].item() == pytest.approx(0.5 / (batch_std + 1e-4))
    weighted, _ = rl.group_advantages(rewards, "none", negative_weight=0.1)
    assert weighted[2].tolist() == pytest.approx([-0.025, -0.025, -0.025, 0.75])  # failures pushed down a tenth
    with pytest.raises(ValueError, match="scale_rewards"):
        rl.group_advantages(rewards, "sometimes")


def test_clipped_surrogate_and_k3_by_hand():
    logp = torch.tensor([-1.0, -1.0, -2.0, -0.5], dtype=torch.float64)
    old = torch.tensor([-1.5, -0.5, -2.0, -0.4], dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0, 0.5, -1.0], dtype=torch.float64)
    loss, clipped, kl = rl.token_losses(logp, old, adv, 0.2, 0.28)
    ratios = [math.exp(0.5), math.exp(-0.5), 1.0, math.exp(-0.1)]
    expected = []
    for r, a in zip(ratios, adv.tolist()):
        expected.append(-min(r * a, min(max(r, 0.8), 1.28) * a))
    assert loss.tolist() == pytest.approx(expected)
    # token 0: ratio 1.65 > 1.28 with A > 0 clips; token 1: ratio 0.61 < 0.8 with A < 0 clips
    assert clipped.tolist() == [True, True, False, False]
    assert kl is None
    ref = torch.tensor([-1.2, -0.7, -2.0, -0.1], dtype=torch.float64)
    loss_kl, _, kl = rl.token_losses(logp, old, adv, 0.2, 0.28, ref, beta=0.5)
    k3 = [math.exp(d) - d - 1 for d in (ref - logp).tolist()]
    assert kl.tolist() == pytest.approx(k3)
    assert all(v >= 0 for v in k3) and k3[2] == 0.0  # k3 is nonnegative, 0 where the policy equals the reference
    assert loss_kl.tolist() == pytest.approx([e + 0.5 * k for e, k in zip(expected, k3)])
    # a token that left the policy's top k after an update (rl_updates > 1): ratio 0, no KL (pi no longer samples it)
    gone = torch.tensor([-math.inf], dtype=torch.float64, requires_grad=True)
    loss_gone, _, kl_gone = rl.token_losses(gone, old[:1], adv[:1], 0.2, 0.28, ref[:1], beta=0.5)
    assert loss_gone.item() == 0.0 and kl_gone.item() == 0.0
    loss_gone.sum().backward()
    assert gone.grad.item() == 0.0


def test_on_policy_gradient_is_advantage_weighted_logprob():
    logp = torch.tensor([-1.0, -2.0, -0.3], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    loss, clipped, _ = rl.token_losses(logp, logp.detach(), adv, 0.2, 0.2)
    loss.sum().backward()
    assert logp.grad.tolist() == pytest.approx((-adv).tolist())  # rho = 1: d/dlogp of -rho A is -A
    assert not clipped.any()


def test_loss_types_by_hand():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    sequence = torch.tensor([0, 0, 0, 1, 1])
    lengths = torch.tensor([3.0, 2.0], dtype=torch.float64)
    assert rl.aggregate(losses, sequence, lengths, "token", 5, 2, 4).item() == pytest.approx(3.0)
    assert rl.aggregate(losses, sequence, lengths, "sequence", 5, 2, 4).item() == pytest.approx((6 / 3 + 9 / 2) / 2)
    assert rl.aggregate(losses, sequence, lengths, "dr_grpo", 5, 2, 4).item() == pytest.approx(15 / 8)
    # a share of a larger global batch: the global normalisers
    assert rl.aggregate(losses, sequence, lengths, "token", 10, 4, 4).item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="rl_loss_type"):
        rl.aggregate(losses, sequence, lengths, "mean", 5, 2, 4)


def test_logprobs_are_the_sampling_policys(seed, monkeypatch):
    """log pi(token) under what sampled it: logits / temperature renormalised over the top k (ties at the k-th value
    kept) by hand; the gradient of a bad token's log-prob reaches only the top k's logits (the full softmax's lifts
    the never-sampled tail too); and completion_logprobs, chunked and recomputed in backward, equals it."""
    logits = torch.tensor([[2.0, 1.0, 1.0, -1.0, 0.5], [0.0, 3.0, -2.0, -2.0, 1.0]], dtype=torch.float64)
    targets = torch.tensor([1, 4])
    got = rl.sampled_logprobs(logits, targets, temperature=0.5, top_k=2)
    row0 = [4.0, 2.0, 2.0]  # the 2 likeliest of row 0 at T = 0.5, and the tie at the second value
    row1 = [6.0, 2.0]
    expected = [2.0 - math.log(sum(math.exp(v) for v in row0)), 2.0 - math.log(sum(math.exp(v) for v in row1))]
    assert got.tolist() == pytest.approx(expected)
    full = logits.log_softmax(-1)[[0, 1], [1, 4]]
    assert rl.sampled_logprobs(logits, targets).tolist() == pytest.approx(full.tolist())
    leaf = logits.clone().requires_grad_()
    rl.sampled_logprobs(leaf, targets, top_k=2)[1].backward()
    assert leaf.grad[1, [2, 3]].tolist() == [0.0, 0.0] and leaf.grad[1, [1, 4]].abs().min() > 0

    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=64, n_layer=1, n_embd=16, n_head=2, block_size=16))
    model.init_weights()
    x, y = rl.padded_rows([[1, 2, 3], [4, 5, 6, 7]], [[8, 9], [10, 11, 12]], 0)
    monkeypatch.setattr(rl, "LOSS_CHUNK_ELEMENTS", 64 * 2)  # two rows a chunk: three chunks for five tokens
    chunked = rl.completion_logprobs(model, model.lm_head, x, y, 0.0, 0.8, 5)
    with torch.no_grad():
        logits = model.logits(model(x))[y >= 0]
    assert chunked.tolist() == pytest.approx(rl.sampled_logprobs(logits, y[y >= 0], 0.8, 5).tolist(), abs=1e-6)
    chunked.sum().backward()
    assert model.lm_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_counting(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))  # correct samples: indices < c
            counted = sum(any(i < c for i in s) for s in subsets) / len(subsets)
            assert rl.pass_at_k(n, c, k) == pytest.approx(counted)


def test_verifier():
    assert rl.final_number("3 + 5 = 8\n#### 8") == "8"
    assert rl.final_number("#### 1,234.") == "1234"
    assert rl.final_number("#### 7 then #### $12") == "12"  # the last one counts
    assert rl.final_number("the answer is 8") is None
    assert rl.reward("3 + 5 = 8\n#### 8", "#### 8") == 1.0
    assert rl.reward("#### 9", "x\n#### 8") == 0.0
    assert rl.reward("#### 9", "#### 8", "answer_format") == rl.FORMAT_REWARD
    assert rl.reward("nine", "#### 8", "answer_format") == 0.0
    assert rl.reward("#### -3", "#### -3") == 1.0


def test_read_problems_names_the_bad_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q2", "answer": "no number"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2:"):
        rl.read_problems(str(path))

# ------------------------------------------------------------------------------------------------- a tiny policy


def tokenizer():
    return Tokenizer(chat_spec())


def biased_policy(tok, allowed, seed):
    """A 1-layer GPT over the GPT-2 + chat vocabulary whose head favours only `allowed` ids at the start: the
    embeddings all share a large component along dimension 0, the final norm keeps only it, and the head's
    column 0 is +1 for the allowed ids and -4 for the rest (the others are random and small)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=50304, n_layer=1, n_embd=16, n_head=2, block_size=48, zero_init_proj=True))
    model.init_weights()
    with torch.no_grad():
        model.wte.weight[:, 0] = 8.0
        model.norm.weight.zero_()
        model.norm.weight[0] = 1.0
        model.lm_head.weight[:, 0] = -4.0
        model.lm_head.weight[allowed, 0] = 1.0
    return model


def settings(**changes):
    s = {"rl_group_size": 8, "rl_prompts": 4, "rl_temperature": 1.0, "rl_top_k": 0, "rl_max_new_tokens": 3,
         "rl_reward": "answer", "rl_scale_rewards": "group", "rl_loss_type": "token", "rl_clip_eps": 0.2,
         "rl_clip_eps_high": 0.0, "rl_updates": 1, "rl_kl_beta": 0.0, "rl_negative_weight": 1.0, "rl_eval_samples": 4,
         "micro_batch": 16, "world_size": 1, "seed": 0}
    return {**s, **changes}


def answer_tokens(tok):
    hashes, five, six = tok.encode_ordinary("####"), tok.encode_ordinary(" 5"), tok.encode_ordinary(" 6")
    end = tok.special["<|assistant_end|>"]
    assert len(hashes) == len(five) == len(six) == 1
    return hashes[0], five[0], six[0], end


def success_rate(model, tok, seed, samples=512):
    """The policy's chance of a final '#### 5', from `samples` fresh completions (standard error about 0.02)."""
    model.eval()
    correct = rl.solve_rates(model, [rl.prompt_ids(tok, "q")], ["#### 5"], samples, answer_tokens(tok)[3],
                             tok.vocab_size, tok, 1.0, None, 3, torch.Generator().manual_seed(seed + 1))
    model.train()
    return correct[0] / samples


@pytest.mark.parametrize("loss_type,updates,steps", [("token", 1, 20), ("sequence", 2, 30)])
def test_rl_raises_the_reward_of_a_tiny_policy(seed, loss_type, updates, steps):
    """Replies over {'####', ' 5', ' 6', <|assistant_end|>}: reward 1 for a final '#### 5' (about a fifth of the
    samples at first). Only the head trains (SGD), so the policy is one distribution over those tokens at every
    position, whose best reward is about one half; the RL steps must lift its success rate, measured on 512 fresh
    samples before and after (the steps' own 32-sample rewards are too noisy to compare), clearly above its start.
    Clipped updates move less per step: over 10 seeds 20 steps gained 0.30-0.40 with the token loss, 0.07-0.34
    with the clipped sequence loss, and 30 steps of the latter 0.16-0.28."""
    tok = tokenizer()
    model = biased_policy(tok, list(answer_tokens(tok)), seed)
    run = rl.RLRun(settings(rl_loss_type=loss_type, rl_updates=updates), tok, model)
    problems = [{"question": f"q{i}", "answer": "#### 5"} for i in range(8)]
    optimizer = torch.optim.SGD([model.lm_head.weight], lr=0.3)

    def optimizer_step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    before = success_rate(model, tok, seed)
    generator = torch.Generator().manual_seed(seed)
    rewards = [run.step(model, problems, generator, optimizer_step, torch.autocast("cpu", enabled=False))["reward"]
               .item() for _ in range(steps)]
    after = success_rate(model, tok, seed)
    assert before < 0.35 and after > before + 0.1, (before, after, rewards)


def test_sampling_stops_at_the_end_token_and_is_reproducible(seed):
    tok = tokenizer()
    hashes, five, six, end = answer_tokens(tok)
    model = biased_policy(tok, [hashes, five, six, end], seed).eval()
    prompt = rl.prompt_ids(tok, "q")
    rows, (entropy, counted) = rl.sample_batch(model, [prompt] * 16, 6, end, 1.0, None,
                                               torch.Generator().manual_seed(seed))
    again, _ = rl.sample_batch(model, [prompt] * 16, 6, end, 1.0, None, torch.Generator().manual_seed(seed))
    assert rows == again
    assert all(end not in r[:-1] and (r[-1] == end or len(r) == 6) for r in rows)
    assert counted == sum(map(len, rows)) and 0 < entropy / counted < math.log(4) + 0.5
    with pytest.raises(ValueError, match="block_size"):
        rl.sample_batch(model, [prompt], 48, end)


def test_prompt_stream_resumes_exactly(seed):
    problems = [{"question": str(i), "answer": "#### 1"} for i in range(10)]
    stream = rl.PromptStream(problems, 3, 0, 1, seed, "cpu")
    for _ in range(4):  # past an epoch boundary
        stream.next_problems()
        torch.rand(1, generator=stream.generator)
    state = stream.state_dict()
    ahead = [(stream.next_problems(), torch.rand(2, generator=stream.generator).tolist()) for _ in range(3)]
    resumed = rl.PromptStream(problems, 3, 0, 1, seed, "cpu")
    resumed.load_state_dict(state)
    assert [(resumed.next_problems(), torch.rand(2, generator=resumed.generator).tolist()) for _ in range(3)] == ahead


def test_ranks_draw_disjoint_prompts():
    problems = [{"question": str(i), "answer": "#### 1"} for i in range(12)]
    streams = [rl.PromptStream(problems, 3, r, 2, 5, "cpu") for r in range(2)]
    for _ in range(2):
        a, b = (s.next_problems() for s in streams)
        assert not {p["question"] for p in a} & {p["question"] for p in b}

# ------------------------------------------------------------------------------------------------- two ranks


def fixed_rollouts(tok, n_prompts):
    """Deterministic prompts, completions of ragged lengths and 0/1 rewards for n_prompts groups of 4."""
    hashes, five, six, end = answer_tokens(tok)
    prompts = [rl.prompt_ids(tok, f"q{i}") for i in range(n_prompts)]
    pool = [[hashes, five, end], [six, end], [hashes, six, end], [hashes, five, five, end], [five, end]]
    completions = [[pool[(i + j) % 5] for j in range(4)] for i in range(n_prompts)]
    rewards = torch.tensor([[float(rl.reward(tok.decode(c[:-1]), "#### 5")) for c in g] for g in completions])
    return prompts, completions, rewards


def policy_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


CASES = [("token", "batch"), ("sequence", "group"), ("dr_grpo", "none")]


def update_grads(model, policy, reference, world_size, rank, loss_type, scale, micro_batch):
    """The gradient of one RL update on this rank's share of the fixed rollouts (all of them in one process)."""
    tok = tokenizer()
    s = settings(world_size=world_size, rl_group_size=4, rl_loss_type=loss_type, rl_scale_rewards=scale,
                 rl_kl_beta=0.1, micro_batch=micro_batch)
    prompts, completions, rewards = fixed_rollouts(tok, 4)
    mine = slice(2 * rank, 2 * rank + 2) if world_size == 2 else slice(None)
    grads = {}
    rl.RLRun(s, tok, model, reference).update(policy, prompts[mine], completions[mine], rewards[mine],
                                              lambda: grads.update(policy_grads(model)),
                                              torch.autocast("cpu", enabled=False))
    model.zero_grad(set_to_none=True)
    return grads


def models(seed):
    tok = tokenizer()
    # float64: a gradient here can be a small difference of large terms, whose float32 rounding depends on threads
    return (biased_policy(tok, list(answer_tokens(tok)), seed).double(),
            biased_policy(tok, list(answer_tokens(tok)), seed + 1).double().requires_grad_(False))


def ddp_worker(rank, store, seed, results):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    model, reference = models(seed)
    ddp = DDP(model, broadcast_buffers=False)
    torch.save([update_grads(model, ddp, reference, 2, rank, *case, micro_batch=3) for case in CASES],
               f"{results}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_rank_gradient_equals_one_process(tmp_path, seed):
    """Each rank holds half of the groups; the loss is normalised over both, so DDP's averaged gradient is the one
    process's gradient over all groups (micro-batches of 3 sequences on the ranks, one of 16 alone), for each loss
    type and reward scaling, the KL term included."""
    mp.spawn(ddp_worker, args=(str(tmp_path / "store"), seed, str(tmp_path)), nprocs=2)
    model, reference = models(seed)
    for i, case in enumerate(CASES):
        grads = update_grads(model, model, reference, 1, 0, *case, micro_batch=16)
        assert grads
        for rank in range(2):
            ranked = torch.load(tmp_path / f"rank{rank}.pt")[i]
            for name, g in grads.items():
                torch.testing.assert_close(ranked[name], g, rtol=1e-4, atol=1e-6,
                                           msg=lambda m: f"{case}: {name}, rank {rank}: {m}")
