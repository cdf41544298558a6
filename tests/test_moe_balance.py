"""The MoE balance loss under gradient accumulation, for every objective: the step's router gradient equals that of
the single-batch `mean loss + balance` computed directly from the model (float64), at strength moe_aux_alpha."""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from model import GPT, GPTConfig
from nanogpt.objectives import batch_weights, make_objective
from nanogpt.parallel import gradient_sync
from nanogpt.posttrain import dpo_loss, pair_logprobs

ALPHA = 0.05  # large, so that a wrongly scaled balance term moves the router's gradient visibly
CFG = dict(block_size=16, vocab_size=40, n_layer=2, n_embd=16, n_head=2, mlp="relu2", n_expert=4, n_expert_active=2,
           n_shared_expert=1, moe_hidden=16, n_dense_layers=1, moe_aux_alpha=ALPHA)


def tiny_moe():
    return GPT(GPTConfig(**CFG)).double().train()


def router_grads(model):
    grads = [m.router.weight.grad.clone() for m in model.moe_layers()]
    model.zero_grad(set_to_none=True)
    return torch.cat([g.flatten() for g in grads])


def tokens(rows, masked):
    x = torch.randint(0, 40, (rows, 16))
    y = torch.randint(0, 40, (rows, 16))
    if masked:  # SFT: targets outside the response are -1
        y[torch.rand(rows, 16) < 0.5] = -1
    return x, y


def accumulated(model, kind, batches, reference=None):
    """The training loop's step: each micro-batch's weighted loss backpropagated in turn."""
    objective = make_objective(kind, model, len(batches), reference, beta=0.1)
    weight, _ = batch_weights(kind, batches, world_size=1)
    for batch in batches:
        loss, _ = objective(batch, weight)
        loss.backward()
    return router_grads(model)


@pytest.mark.parametrize("masked", [False, True], ids=["pretraining", "sft"])
def test_next_token_balance_gradient_under_accumulation(seed, masked):
    model = tiny_moe()
    x, y = tokens(8, masked)
    ce, balance = model(x, y)
    assert balance.item() > 0
    (ce / (y >= 0).sum() + balance).backward()
    direct = router_grads(model)
    got = accumulated(model, "next_token", [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)])
    assert torch.allclose(got, direct, rtol=1e-9, atol=1e-10)  # float64 sums in another order
    ce, balance = model(x, y)  # the old weighting, the balance loss inside the summed loss: alpha / counted
    ((ce + balance) / (y >= 0).sum()).backward()
    assert not torch.allclose(router_grads(model), direct, rtol=1e-3, atol=0)


def test_dpo_balance_gradient_under_accumulation(seed):
    model = tiny_moe()
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():  # a policy a little away from the reference, so the DPO loss has a gradient of its own
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    xc, yc = tokens(4, masked=True)
    xr, yr = tokens(4, masked=True)
    *policy, balance = pair_logprobs(model, xc, yc, xr, yr)
    with torch.no_grad():
        *frozen, _ = pair_logprobs(reference, xc, yc, xr, yr)
    assert balance.item() > 0
    (dpo_loss(*policy, *frozen, beta=0.1).loss + balance).backward()
    direct = router_grads(model)
    batches = [(xc[i:i + 2], yc[i:i + 2], xr[i:i + 2], yr[i:i + 2]) for i in (0, 2)]
    got = accumulated(model, "dpo", batches, reference)
    assert torch.allclose(got, direct, rtol=1e-9, atol=1e-10)  # float64 sums in another order
    *policy, _ = pair_logprobs(model, xc, yc, xr, yr)  # without the balance loss, as DPO trained before
    dpo_loss(*policy, *frozen, beta=0.1).loss.backward()
    assert not torch.allclose(router_grads(model), direct, rtol=1e-3, atol=0)


def test_evaluation_and_dense_models_have_no_balance_loss():
    model = tiny_moe().eval()
    x, y = tokens(2, masked=False)
    assert model(x, y)[1].item() == 0.0
    dense = GPT(GPTConfig(**dict(CFG, n_expert=0))).train()
    assert dense(x, y)[1].item() == 0.0


def ddp_worker(rank, store, seed, results):
    """Half of the batch per rank, two micro-batches each, gradients averaged by DDP."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(seed)
    model = tiny_moe()
    x, y = tokens(8, masked=True)
    ddp = DDP(model, broadcast_buffers=False, find_unused_parameters=True)  # an expert may see no token
    mine = [(x[i:i + 2], y[i:i + 2]) for i in (4 * rank, 4 * rank + 2)]
    objective = make_objective("next_token", ddp, len(mine))
    weight, _ = batch_weights("next_token", mine, world_size=2)
    for step, batch in enumerate(mine):
        with gradient_sync(ddp, step == len(mine) - 1):
            loss, _ = objective(batch, weight)
            loss.backward()
    torch.save(router_grads(model), f"{results}/rank{rank}.pt")
    dist.destroy_process_group()


def test_balance_gradient_under_two_process_ddp(tmp_path, seed):
    mp.spawn(ddp_worker, args=(str(tmp_path / "store"), seed, str(tmp_path)), nprocs=2)
    torch.manual_seed(seed)
    model = tiny_moe()
    x, y = tokens(8, masked=True)
    ce, balance = model(x, y)
    (ce / (y >= 0).sum() + balance).backward()
    direct = router_grads(model)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(got, direct, rtol=1e-9, atol=1e-10)
