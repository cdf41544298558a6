"""nanogpt/optim.py against independent references: Newton-Schulz against the SVD, Muon steps against a naive float64
implementation, the schedules at their edges, the parameter groups, and the optimizer state the memory plan counts.
Distributed Muon (DDP, FSDP2) against one process is in tests/test_distributed.py; exact resume in test_train.py."""
import math

import pytest
import torch

from model import GPT, GPTConfig
from nanogpt.optim import (
    MUON_GROUPS,
    NEWTON_SCHULZ,
    Muon,
    build_optimizer,
    group_of,
    orthogonalize,
    scheduled_lr,
    scheduled_momentum,
    set_lr,
    state_bytes,
)

pytestmark = pytest.mark.usefixtures("seed")
# Measured over 200 random matrices per table (shapes 32x64 to 16x200, singular values spanning 50x, scales 1e-3 to
# 1e3): quintic 0.682-1.134, Polar Express 0.860-1.141; off-diagonal of U^T O V below 3e-6.
BANDS = {"quintic": (0.67, 1.15), "polar_express": (0.85, 1.15)}


def with_singular_values(s, m, n):
    """(U, V, U diag(s) V^T) in float64 with random orthonormal U (m x k) and V (n x k)."""
    u, _ = torch.linalg.qr(torch.randn(m, len(s), dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), dtype=torch.float64))
    return u, v, u @ torch.diag(s) @ v.T


@pytest.mark.parametrize("coefficients", list(NEWTON_SCHULZ))
@pytest.mark.parametrize("m, n", [(32, 64), (64, 32), (48, 48), (16, 200)])
def test_newton_schulz_keeps_the_svd_directions_and_lands_in_its_band(coefficients, m, n):
    k = min(m, n)
    s = torch.logspace(math.log10(0.02), 0, k, dtype=torch.float64)[torch.randperm(k)]
    u, v, g = with_singular_values(s * 10 ** (6 * torch.rand(()).item() - 3), m, n)
    o = orthogonalize(g.float(), NEWTON_SCHULZ[coefficients]).double()
    d = u.T @ o @ v  # diagonal iff O = U f(S) V^T: the polar factor's directions, singular values f(s)
    low, high = BANDS[coefficients]
    assert (d - torch.diag(torch.diagonal(d))).abs().max() < 1e-4
    assert low < torch.diagonal(d).min() and torch.diagonal(d).max() < high, torch.diagonal(d)
    assert o.shape == g.shape and torch.linalg.matrix_norm(o - u @ v.T, 2) < 0.35  # near U V^T in every direction


def test_newton_schulz_batches_stacked_experts_one_matrix_each():
    g = torch.randn(3, 16, 40)
    batched = orthogonalize(g, NEWTON_SCHULZ["quintic"])
    for e in range(3):
        assert torch.allclose(batched[e], orthogonalize(g[e], NEWTON_SCHULZ["quintic"]), atol=1e-6)


# ------------------------------------------------------------------------------------------- Muon vs naive float64

def naive_orthogonalize(g, coefficients, steps=5):
    x = g / (torch.linalg.matrix_norm(g) * 1.02 + 1e-7)
    for a, b, c in coefficients[:steps]:
        x = a * x + b * (x @ x.T) @ x + c * (x @ x.T) @ (x @ x.T) @ x  # the same odd polynomial, either orientation
    return x


def naive_muon_steps(weights, grads_per_step, lr, wd, mu, nesterov, coefficients, normalize, beta2):
    """Muon on a list of matrices (a 3-D tensor is a list of expert matrices), float64, one matrix at a time."""
    weights = [w.double().clone() for w in weights]
    buffers = [torch.zeros_like(w) for w in weights]
    second = [torch.zeros(w.shape[:-1] + (1,), dtype=torch.float64) for w in weights]
    for grads in grads_per_step:
        for w, g, buf, v in zip(weights, grads, buffers, second):
            g = g.double()
            buf.mul_(mu).add_((1 - mu) * g)
            u = (1 - mu) * g + mu * buf if nesterov else buf.clone()
            mats = u if u.dim() == 3 else u[None]
            o = torch.stack([naive_orthogonalize(x, coefficients) for x in mats]).view_as(u)
            if normalize:
                v.mul_(beta2).add_((1 - beta2) * (o * o).mean(-1, keepdim=True))
                balanced = o / (v.sqrt() + 1e-8)
                frobenius = (o * o).sum((-2, -1), keepdim=True).sqrt()
                o = balanced * frobenius / ((balanced ** 2).sum((-2, -1), keepdim=True).sqrt() + 1e-8)
            w.mul_(1 - lr * wd).sub_(lr * 0.2 * math.sqrt(max(w.shape[-2:])) * o)
    return weights


@pytest.mark.parametrize("nesterov, coefficients, normalize", [(True, "quintic", False), (False, "quintic", False),
                                                               (True, "polar_express", True)])
def test_muon_steps_match_a_naive_float64_muon(nesterov, coefficients, normalize):
    shapes = [(24, 40), (40, 24), (3, 16, 24)]
    weights = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    groups = [{"params": weights, "kind": "muon", "lr_scale": 1.0, "weight_decay": 0.1, "name": "matrices"}]
    opt = Muon(groups, momentum=0.9, nesterov=nesterov, coefficients=coefficients, normalize=normalize,
               normalize_beta2=0.95)
    set_lr(opt, 0.02)
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    expected = naive_muon_steps([w.detach() for w in weights], grads, 0.02, 0.1, 0.9, nesterov,
                                NEWTON_SCHULZ[coefficients], normalize, 0.95)
    for step_grads in grads:
        for w, g in zip(weights, step_grads):
            w.grad = g.clone()
        opt.step()
    for w, e in zip(weights, expected):
        assert (w.double() - e).abs().max() < 2e-5 * e.abs().max(), (w.double() - e).abs().max()


@pytest.mark.parametrize("normalize", [False, True])
def test_muon_treats_a_swiglu_experts_gate_and_up_as_two_matrices_like_the_dense_mlp(seed, normalize):
    """A SwiGLU expert stacks [gate; up] in one (2h, d) weight; Muon must step each half as the dense MLP steps its
    separate gate_proj and up_proj: the naive float64 Muon over the 2E matrices (h, d) is the reference."""
    E, h, d = 3, 8, 12
    weight = torch.nn.Parameter(torch.randn(E, 2 * h, d))
    groups = [{"params": [weight], "kind": "muon", "lr_scale": 1.0, "weight_decay": 0.1, "name": "experts"}]
    opt = Muon(groups, momentum=0.9, normalize=normalize, normalize_beta2=0.95, row_parts={weight: 2})
    set_lr(opt, 0.02)
    grads = [[torch.randn(E, 2 * h, d)] for _ in range(3)]
    expected = naive_muon_steps([weight.detach().view(2 * E, h, d)], [[g.view(2 * E, h, d)] for g, in grads], 0.02,
                                0.1, 0.9, True, NEWTON_SCHULZ["quintic"], normalize, 0.95)[0].view(E, 2 * h, d)
    fused = naive_muon_steps([weight.detach()], grads, 0.02, 0.1, 0.9, True, NEWTON_SCHULZ["quintic"], normalize,
                             0.95)[0]
    for (g,) in grads:
        weight.grad = g.clone()
        opt.step()
    assert (weight.double() - expected).abs().max() < 2e-5 * expected.abs().max()
    assert (weight.double() - fused).abs().max() > 1e-3 * fused.abs().max()  # the one-matrix step is another step


def test_build_optimizer_splits_exactly_the_swiglu_expert_weights():
    for mlp, stacked in (("swiglu", True), ("relu2", False)):
        model = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=16, vocab_size=37, mlp=mlp, n_expert=4,
                              n_dense_layers=1))
        opt = build_optimizer("muon", model, 0.01, 0.1, (0.9, 0.95), {}, "cpu")
        assert opt.row_parts == ({model.blocks[1].mlp.w_up: 2} if stacked else {})


def test_muon_leaves_embedding_head_router_and_vectors_to_adamw_with_its_exact_maths():
    model = GPT(GPTConfig(n_layer=2, n_embd=16, n_head=2, vocab_size=11, n_expert=4, n_dense_layers=1,
                          value_embeds=1))
    opt = build_optimizer("muon", model, 0.01, 0.1, (0.9, 0.95), {"embedding": 3.0}, "cpu")
    kinds = {g["name"]: g["kind"] for g in opt.param_groups}
    assert kinds == {"matrices": "muon", "experts": "muon", "embedding": "adamw", "lm_head": "adamw",
                     "router": "adamw", "vectors": "adamw"}
    names = {p: n for n, p in model.named_parameters()}
    assert {group_of(names[p], p) for g in opt.param_groups if g["kind"] == "muon" for p in g["params"]} == \
        set(MUON_GROUPS)
    wte = model.wte.weight
    before, reference = wte.detach().clone(), torch.optim.AdamW([wte.detach().clone().requires_grad_()],
                                                                lr=0.03, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(3):
        g = torch.randn_like(wte)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        wte.grad = g
        reference.param_groups[0]["params"][0].grad = g.clone()
        opt.step()
        reference.step()
    assert not torch.equal(wte, before)
    assert torch.allclose(wte, reference.param_groups[0]["params"][0], atol=1e-6)  # lr 0.01 x embedding scale 3


def test_state_bytes_counts_what_each_optimizer_keeps():
    model = GPT(GPTConfig(n_layer=2, n_embd=16, n_head=2, vocab_size=11, n_expert=4, n_dense_layers=1))
    total = sum(p.numel() for p in model.parameters())
    muon = sum(p.numel() for n, p in model.named_parameters() if group_of(n, p) in MUON_GROUPS)
    rows = sum(p.numel() // p.shape[-1] for n, p in model.named_parameters() if group_of(n, p) in MUON_GROUPS)
    assert state_bytes("adamw", model) == 8 * total
    assert state_bytes("muon", model) == 8 * (total - muon) + 4 * muon
    assert state_bytes("muon", model, normalize=True) == 8 * (total - muon) + 4 * muon + 4 * rows
    opt = build_optimizer("muon", model, 0.01, 0.1, (0.9, 0.95), {}, "cpu")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    kept = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    assert kept == state_bytes("muon", model)


# ---------------------------------------------------------------------------------------------------- schedules

@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "constant"])
def test_schedules_at_their_edges(schedule):
    lr, low, warm, end = 1.0, 0.1, 10, 110

    def at(it, shape="linear"):
        return scheduled_lr(it, schedule, lr, low, warm, end, 0.2, shape)
    assert at(0) == pytest.approx(1 / 11) and at(9) == pytest.approx(10 / 11)  # warmup never reaches 0 or skips lr
    assert at(10) == pytest.approx(1.0)
    if schedule == "constant":
        assert at(60) == at(10_000) == 1.0
        return
    assert at(110) == at(500) == low
    if schedule == "wsd":  # stable until 80% of decay_iters, then down in the chosen shape
        assert at(87) == 1.0 and at(88) == 1.0
        half = 88 + 11
        assert at(half, "linear") == pytest.approx(low + 0.5 * (lr - low))
        assert at(half, "cosine") == pytest.approx(low + 0.5 * (lr - low))
        assert at(half, "1-sqrt") == pytest.approx(low + (1 - math.sqrt(0.5)) * (lr - low))
        assert at(92, "1-sqrt") < at(92, "linear") < at(92, "cosine")  # 1-sqrt drops fastest, cosine slowest
    else:  # a quarter, half and three quarters of the way from warmup's end to decay_iters
        left = {"cosine": lambda f: 0.5 * (1 + math.cos(math.pi * f)), "linear": lambda f: 1 - f}[schedule]
        for it, done in ((35, 0.25), (60, 0.5), (85, 0.75)):
            assert at(it) == pytest.approx(low + left(done) * (lr - low))


def test_decay_that_ends_before_warmup_gives_min_lr():
    assert scheduled_lr(5, "cosine", 1.0, 0.1, warmup_iters=10, decay_iters=4) == 0.1


def test_every_group_follows_the_schedule_from_its_own_lr_and_muon_momentum_warms_up():
    model = GPT(GPTConfig(n_layer=1, n_embd=16, n_head=2, vocab_size=11))
    opt = build_optimizer("muon", model, 0.5, 0.0, (0.9, 0.95), {"lm_head": 0.1, "embedding": 4.0}, "cpu")
    set_lr(opt, 0.25, scheduled_momentum(150, 0.85, 0.95, 300))
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["lm_head"] == pytest.approx(0.025) and lrs["embedding"] == pytest.approx(1.0)
    assert lrs["matrices"] == pytest.approx(0.25)
    momenta = {g["name"]: g["momentum"] for g in opt.param_groups}
    assert momenta["matrices"] == pytest.approx(0.90) and momenta["embedding"] == 0.95  # AdamW groups: untouched
    assert scheduled_momentum(0, 0.85, 0.95, 300) == 0.85 and scheduled_momentum(300, 0.85, 0.95, 300) == 0.95
    assert scheduled_momentum(7, 0.85, 0.95, 0) == 0.95
