"""The optimizer and the learning-rate schedule.

The parameters are split into named groups, each with its own learning-rate multiplier (the `lr_scales` setting,
1 when not named) and weight decay:
    matrices   hidden 2-D weights: attention projections, MLPs, shared experts
    experts    the stacked (n_expert, out, in) routed-expert weights
    embedding  the token embedding (also the head when tie_embeddings)
    lm_head    the output projection
    router     the MoE routers
    vectors    norms and any other 1-D parameter (no weight decay)
The schedule gives a base lr per iteration and every group runs at its multiplier times it, so each group follows
the schedule from its own initial lr. Adding an optimizer: one function that takes these groups, one name in
`build_optimizer`, and its state size in `state_bytes` (the memory plan asks for it).
"""
import math

import torch

GROUPS = ("matrices", "experts", "embedding", "lm_head", "router", "vectors")
OPTIMIZERS = ("adamw",)
SCHEDULES = ("cosine", "wsd")


def group_of(name, param):
    """The group of a parameter, by its name in the model (the same under FSDP2, whose parameters are DTensors)."""
    if name == "wte.weight":
        return "embedding"
    if name == "lm_head.weight":
        return "lm_head"
    if name.endswith("router.weight"):
        return "router"
    return {3: "experts", 2: "matrices"}.get(param.dim(), "vectors")


def param_groups(model, lr, weight_decay, lr_scales):
    """torch.optim parameter groups, one per non-empty named group, each carrying its name and lr multiplier."""
    unknown = set(lr_scales) - set(GROUPS)
    if unknown:
        raise ValueError(f"lr_scales names unknown groups {sorted(unknown)}; the groups are {', '.join(GROUPS)}")
    members = {g: [] for g in GROUPS}
    for name, p in model.named_parameters():  # a tied head is the embedding's parameter, listed once
        if p.requires_grad:
            members[group_of(name, p)].append(p)
    return [{"name": g, "params": ps, "lr_scale": float(lr_scales.get(g, 1.0)), "lr": lr * lr_scales.get(g, 1.0),
             "weight_decay": 0.0 if g == "vectors" else weight_decay} for g, ps in members.items() if ps]


def adamw(groups, betas, fused):
    return torch.optim.AdamW(groups, betas=betas, fused=fused)


def build_optimizer(name, model, lr, weight_decay, betas, lr_scales, device_type):
    groups = param_groups(model, lr, weight_decay, lr_scales)
    if name == "adamw":
        return adamw(groups, betas, fused=device_type == "cuda")
    raise ValueError(f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}, got {name!r}")


def state_bytes(name, model):
    """Bytes of optimizer state for the whole model (the memory plan shards it under FSDP)."""
    n = sum(p.numel() for p in model.parameters())
    if name == "adamw":
        return 8 * n  # two fp32 moments per parameter
    raise ValueError(f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}, got {name!r}")


def load_optimizer_state(optimizer, state):
    """Load a saved optimizer state but keep this run's group settings (lr multipliers, weight decay): a resumed
    run follows its config, not the checkpoint's. A different group layout is refused with the names."""
    saved = [g.get("name") for g in state["param_groups"]]
    ours = [g["name"] for g in optimizer.param_groups]
    if saved != ours:
        raise ValueError(f"the checkpoint's optimizer has parameter groups {saved}, this run {ours}: it was written "
                         "by another version or optimizer; start a new phase with init_from=<ckpt.pt> instead")
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, ours in zip(optimizer.param_groups, settings):
        group.update({k: v for k, v in ours.items() if k != "lr"})


# ------------------------------------------------------------------------------------------------------ schedule

def scheduled_lr(it, schedule, lr, min_lr, warmup_iters, decay_iters, wsd_decay_frac):
    """Base learning rate at iteration `it`: linear warmup, then cosine decay to min_lr at decay_iters, or for
    'wsd' (warmup-stable-decay) flat until the last wsd_decay_frac of decay_iters, then linear to min_lr."""
    if it >= decay_iters:
        return min_lr
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    if schedule == "wsd":
        decay_start = max(warmup_iters, int(decay_iters * (1 - wsd_decay_frac)))
        if it < decay_start:
            return lr
        return min_lr + (lr - min_lr) * (1 - (it - decay_start) / (decay_iters - decay_start))
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def set_lr(optimizer, lr):
    """Every group at its multiplier times the base lr."""
    for group in optimizer.param_groups:
        group["lr"] = group["lr_scale"] * lr
