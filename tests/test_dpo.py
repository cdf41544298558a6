"""nanogpt/posttrain.py: the DPO / cDPO / IPO loss against hand-computed float64 values, its gradients and statistics,
response log-probs against a log-softmax reference, and the new-token rows of a base checkpoint."""
import math
from dataclasses import asdict

import pytest
import torch

from model import GPT, GPTConfig
from nanogpt.posttrain import adapt_checkpoint, dpo_loss, dpo_objective, pair_logprobs, response_logprobs
from nanogpt.tokenizer import chat_spec

# Fixed summed log-probs of three pairs: policy chosen / rejected, reference chosen / rejected.
# h = (pc - pr) - (rc - rr) = [1.5, 0.5, 0.0]
PC, PR = [-10.0, -8.0, -20.0], [-12.0, -7.0, -19.0]
RC, RR = [-11.0, -9.0, -20.0], [-11.5, -7.5, -19.0]


def tensors(*lists):
    return [torch.tensor(v, dtype=torch.float64) for v in lists]


def softplus(z):
    return math.log1p(math.exp(-abs(z))) + max(z, 0.0)


def reference_loss(pc, pr, rc, rr, beta, smoothing=0.0, ipo=False):
    """The losses written out per pair in plain Python floats."""
    total = 0.0
    for a, b, c, d in zip(pc, pr, rc, rr):
        h = (a - b) - (c - d)
        # -log sigmoid(z) = softplus(-z)
        if ipo:
            total += (h - 1 / (2 * beta)) ** 2
        else:
            total += (1 - smoothing) * softplus(-beta * h) + smoothing * softplus(beta * h)
    return total / len(pc)


def test_fixed_values_by_hand():
    stats = dpo_loss(*tensors(PC, PR, RC, RR), beta=0.1)
    # mean of log(1 + e^-0.15), log(1 + e^-0.05), log 2
    assert stats.loss.item() == pytest.approx(0.6608546254542546, abs=1e-12)
    assert stats.chosen_reward.item() == pytest.approx(0.2 / 3, abs=1e-12)  # 0.1 * mean(1, 1, 0)
    assert stats.rejected_reward.item() == pytest.approx(0.0, abs=1e-12)  # 0.1 * mean(-0.5, 0.5, 0)
    assert stats.margin.item() == pytest.approx(0.2 / 3, abs=1e-12)
    assert stats.accuracy.item() == pytest.approx(2 / 3)  # the tie of the third pair counts as wrong
    assert stats.likelihood_accuracy.item() == pytest.approx(1 / 3)  # only -10 > -12
    smoothed = dpo_loss(*tensors(PC, PR, RC, RR), beta=0.1, label_smoothing=0.1)
    assert smoothed.loss.item() == pytest.approx(0.6675212921209212, abs=1e-12)
    ipo = dpo_loss(*tensors(PC, PR, RC, RR), beta=0.1, ipo=True)
    assert ipo.loss.item() == pytest.approx((3.5 ** 2 + 4.5 ** 2 + 5 ** 2) / 3, abs=1e-12)  # (h - 5)^2


@pytest.mark.parametrize("beta, smoothing, ipo", [(0.1, 0.0, False), (0.5, 0.2, False), (0.05, 0.0, True)])
def test_random_log_probs_match_the_written_out_loss(seed, beta, smoothing, ipo):
    pc, pr, rc, rr = (-torch.rand(64, dtype=torch.float64) * 200 for _ in range(4))
    stats = dpo_loss(pc, pr, rc, rr, beta, smoothing, ipo)
    assert stats.loss.item() == pytest.approx(reference_loss(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), beta,
                                                             smoothing, ipo), rel=1e-12)
    wins = [beta * (a - c) > beta * (b - d) for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]
    assert stats.accuracy.item() == pytest.approx(sum(wins) / 64)


@pytest.mark.parametrize("smoothing, ipo", [(0.0, False), (0.3, False), (0.0, True)])
def test_gradients_reach_the_policy_only(seed, smoothing, ipo):
    pc, pr, rc, rr = ((torch.rand(8, dtype=torch.float64) * -10).requires_grad_() for _ in range(4))
    torch.autograd.gradcheck(lambda a, b: dpo_loss(a, b, rc, rr, 0.3, smoothing, ipo).loss, (pc, pr))
    dpo_loss(pc, pr, rc, rr, 0.3, smoothing, ipo).loss.backward()
    assert rc.grad is None and rr.grad is None
    if not ipo and not smoothing:  # DPO always raises the chosen and lowers the rejected log-prob
        assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_bad_settings():
    args = tensors(PC, PR, RC, RR)
    for kwargs, message in [({"beta": 0}, "beta must be > 0"), ({"label_smoothing": 0.5}, r"\[0, 0.5\)"),
                            ({"label_smoothing": 0.1, "ipo": True}, "not of IPO")]:
        with pytest.raises(ValueError, match=message):
            dpo_loss(*args, **kwargs)


def test_response_logprobs_sum_the_response_tokens(seed):
    cfg = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_embd=16, n_head=2)
    model = GPT(cfg).double().eval()
    x = torch.randint(0, 50, (3, 16))
    y = torch.randint(0, 50, (3, 16))
    y[torch.rand(3, 16) < 0.5] = -1
    with torch.no_grad():
        logits = model.logits(model(x))
        got, _ = response_logprobs(model, x, y)
        mean, _ = response_logprobs(model, x, y, mean=True)
    logp = logits.double().log_softmax(-1).gather(2, y.clamp(min=0)[..., None])[..., 0]
    assert torch.allclose(got, (logp * (y >= 0)).sum(1), rtol=1e-6, atol=1e-6)
    assert torch.allclose(mean, (logp * (y >= 0)).sum(1) / (y >= 0).sum(1), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        chosen, rejected, _ = pair_logprobs(model, x, y, x.flip(0), y.flip(0))
    assert torch.allclose(chosen, got, atol=1e-9) and torch.allclose(rejected, got.flip(0), atol=1e-9)


def hand_logprob(model, x, y, mean):
    """One response's log-probability from the full logits, token by token: summed, or the mean per counted token."""
    logp = model.logits(model(x[None]))[0].double().log_softmax(-1)
    picked = [logp[t, y[t]] for t in range(len(y)) if y[t] >= 0]
    return sum(picked) / len(picked) if mean else sum(picked)


@pytest.mark.parametrize("ipo", [False, True], ids=["dpo_sums", "ipo_means"])
def test_dpo_sums_and_ipo_averages_the_response_tokens(seed, ipo):
    cfg = GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_embd=16, n_head=2)
    policy, reference = GPT(cfg).double().eval(), GPT(cfg).double().eval()
    xc, yc, xr, yr = (torch.randint(0, 50, (2, 16)) for _ in range(4))
    yc[:, :5], yr[:, :9] = -1, -1  # responses of different lengths: a sum and a mean differ
    beta = 0.5
    with torch.no_grad():
        loss, _, _ = dpo_objective(policy, reference, (xc, yc, xr, yr), beta, ipo=ipo)
        h = [(hand_logprob(policy, xc[i], yc[i], ipo) - hand_logprob(policy, xr[i], yr[i], ipo))
             - (hand_logprob(reference, xc[i], yc[i], ipo) - hand_logprob(reference, xr[i], yr[i], ipo))
             for i in range(2)]
    hand = (sum((v - 1 / (2 * beta)) ** 2 for v in h) if ipo else sum(-torch.nn.functional.logsigmoid(beta * v)
                                                                           for v in h)) / 2
    assert loss.item() == pytest.approx(hand.item(), rel=1e-9)


# ------------------------------------------------------------------------------------------------------ new tokens

def base_checkpoint(vocab_size, tie=False):
    cfg = GPTConfig(block_size=8, vocab_size=vocab_size, n_layer=1, n_embd=16, n_head=2, tie_embeddings=tie)
    return {"model": GPT(cfg).state_dict(), "model_args": asdict(cfg), "tokenizer": {"kind": "gpt2"}}


@pytest.mark.parametrize("tie", [False, True])
def test_unpadded_base_checkpoint_grows_with_mean_rows(seed, tie):
    base = base_checkpoint(50257, tie)
    before = {k: v.clone() for k, v in base["model"].items()}
    adapted, message = adapt_checkpoint(base, chat_spec(), 50304)
    assert "6 tokens new to the checkpoint" in message and "grew from 50,257 to 50,304 rows" in message
    for key in ("wte.weight", "lm_head.weight"):
        old, new = before[key], adapted["model"][key]
        assert new.shape == (50304, 16) and torch.equal(new[:50257], old)
        mean = old.double().mean(0)
        assert torch.allclose(new[50257:].double(), mean.expand(47, -1), atol=1e-6)
    assert all(torch.equal(base["model"][k], v) for k, v in before.items())  # the input is not changed
    assert adapted["model_args"]["vocab_size"] == 50304 and adapted["tokenizer"] == chat_spec()
    model = GPT(GPTConfig(**adapted["model_args"]))
    model.load_state_dict(adapted["model"])
    assert (model.wte.weight is model.lm_head.weight) == tie


def test_padded_base_checkpoint_gets_mean_rows_for_the_chat_tokens_only(seed):
    base = base_checkpoint(50304)
    old = base["model"]["lm_head.weight"]
    adapted, message = adapt_checkpoint(base, chat_spec(), 50304)
    assert "grew" not in message and "mean of its 50,257 trained rows" in message
    new = adapted["model"]["lm_head.weight"]
    assert torch.equal(new[:50257], old[:50257]) and torch.equal(new[50263:], old[50263:])
    assert torch.allclose(new[50257:50263].double(), old[:50257].double().mean(0).expand(6, -1), atol=1e-6)


def test_nothing_to_adapt_and_refusals():
    chat = dict(base_checkpoint(50304), tokenizer=chat_spec())
    assert adapt_checkpoint(chat, chat_spec(), 50304) == (chat, None)
    with pytest.raises(ValueError, match=r"trained with the GPT-2 BPE \+ 6 special tokens tokenizer but the data is"):
        adapt_checkpoint(chat, {"kind": "gpt2"}, 50304)
    char = dict(base_checkpoint(65), tokenizer={"kind": "char", "chars": "ab"})
    with pytest.raises(ValueError, match="character-level"):
        adapt_checkpoint(char, chat_spec(), 50304)
    with pytest.raises(ValueError, match="more than this run's 50,257"):
        adapt_checkpoint(base_checkpoint(50304), {"kind": "gpt2"}, 50257)
