"""The optimizers and the learning-rate schedule.

The parameters are split into named groups, each with its own learning-rate multiplier (the `lr_scales` setting,
1 when not named) and weight decay:
    matrices   hidden 2-D weights: attention projections, MLPs, shared experts
    experts    the stacked (n_expert, out, in) routed-expert weights
    embedding  the token embeddings (also the head when tie_embeddings)
    lm_head    the output projection
    router     the MoE routers
    memory     product-key memory value tables (AdamW always, no weight decay: a step touches few rows)
    vectors    norms, product keys and any other non-matrix parameter (no weight decay)
    lora       LoRA adapters (nanogpt/lora.py): AdamW, no weight decay; a LoRA run trains nothing else
Optimizers: 'adamw' (torch's) for every group, or 'muon': Muon for the matrices and experts, AdamW for the other
groups. The schedule gives a base lr per iteration and every group runs at its multiplier times it, so each group
follows the schedule from its own initial lr. Adding an optimizer: a class or function that takes these groups, one
name in `build_optimizer`, and its state size in `state_bytes` (the memory plan asks for it).
"""
import math

import torch
import torch.distributed as dist

from model import MoE

GROUPS = ("matrices", "experts", "embedding", "lm_head", "router", "memory", "vectors", "lora")
MUON_GROUPS = ("matrices", "experts")
OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd", "linear", "constant")
WSD_SHAPES = ("linear", "cosine", "1-sqrt")


def group_of(name, param):
    """The group of a parameter, by its name in the model (the same under FSDP2, whose parameters are DTensors)."""
    if name == "wte.weight" or name.startswith("value_embeds."):
        return "embedding"
    if name.endswith((".lora_A", ".lora_B")):
        return "lora"
    if name == "lm_head.weight":
        return "lm_head"
    if name.endswith("router.weight"):
        return "router"
    if name.endswith("mlp.values.weight"):
        return "memory"
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
             "weight_decay": 0.0 if g in ("vectors", "memory", "lora") else weight_decay}
            for g, ps in members.items() if ps]


# -------------------------------------------------------------------------------------------------------- Muon
# Muon (Jordan et al. 2024): SGD momentum (Nesterov), then the update replaced by the orthogonal factor U V^T of its
# SVD U S V^T, computed approximately by an odd matrix polynomial iterated a few times (Newton-Schulz). The step
# X <- a X + (b A + c A^2) X with A = X X^T maps each singular value s to a s + b s^3 + c s^5.

# Keller Jordan's quintic, the same (a, b, c) every step: drives singular values into roughly [0.7, 1.2].
QUINTIC = [(3.4445, -4.7750, 2.0315)] * 5
# Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv:2505.16932; 5 steps, safety factor 2e-2, cushion 2): a
# minimax-optimal polynomial per step, so the singular values end closer to 1 after the same number of steps.
POLAR_EXPRESS = [(8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]
NEWTON_SCHULZ = {"quintic": QUINTIC, "polar_express": POLAR_EXPRESS}


def orthogonalize(g, coefficients, steps=5):
    """Approximately U V^T for each matrix of g (..., m, n): in bf16 on CUDA (fast, and accurate enough, as Muon's
    authors found), fp32 elsewhere. Works on the wide orientation, so A = X X^T is the smaller Gram matrix. Steps
    beyond the table repeat its last row."""
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    wide = x.size(-2) <= x.size(-1)
    if not wide:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-7)  # spectral norm <= Frobenius norm: now below 1
    for a, b, c in [coefficients[min(i, len(coefficients) - 1)] for i in range(steps)]:
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.mT).to(g.dtype)


def update_scale(shape):
    """Muon's orthogonal update has RMS 1/sqrt(max(m, n)); times 0.2 sqrt(max(m, n)) it has AdamW's typical update
    RMS of 0.2 (Liu et al. 2025, "Muon is scalable for LLM training"), so learning_rate and weight_decay carry over
    from AdamW and one lr schedule drives both kinds of group."""
    return 0.2 * math.sqrt(max(shape[-2], shape[-1]))


def balance_rows(update, second_moment, beta2, eps=1e-8):
    """NorMuon (Li et al. 2025, arXiv:2510.05491), first half: divide each row (output neuron) of the orthogonal
    update by the root of its running mean square, so neurons move at even speeds."""
    second_moment.lerp_(update.float().square().mean(-1, keepdim=True), 1 - beta2)
    return update.float() / (second_moment.sqrt() + eps)


def restore_norms(updates, balanced, shapes, sharded, eps=1e-8):
    """NorMuon, second half: scale each balanced update back to its update's Frobenius norm (per expert for stacked
    experts). Under FSDP a matrix's rows are spread over ranks, so its sums of squares are added up over ranks."""
    sums = [torch.stack([u.float().square().sum((-2, -1)), b.square().sum((-2, -1))])
            for u, b in zip(updates, balanced)]
    if sharded:
        row_sharded = [i for i, shape in enumerate(shapes) if len(shape) == 2]
        if row_sharded:
            total = torch.stack([sums[i] for i in row_sharded])
            dist.all_reduce(total)
            for i, s in zip(row_sharded, total):
                sums[i] = s
    return [(b * (s[0].sqrt() / (s[1].sqrt() + eps))[..., None, None]).to(u.dtype)
            for u, b, s in zip(updates, balanced, sums)]


def local(t):
    """The local shard of an FSDP2 DTensor (a view: in-place ops change the parameter), or t itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def orthogonalize_stacked(updates, coefficients, steps):
    """orthogonalize for a list of matrices, those of one shape stacked into one batched call: a few large ops
    instead of many small ones (on a CPU a small model's step spends more on launching ops than on their FLOPs)."""
    by_shape, out = {}, [None] * len(updates)
    for i, u in enumerate(updates):
        by_shape.setdefault((u.shape, u.dtype, u.device), []).append(i)
    for indices in by_shape.values():
        stacked = orthogonalize(torch.stack([updates[i] for i in indices]), coefficients, steps)
        for i, o in zip(indices, stacked.unbind(0)):
            out[i] = o
    return out


def orthogonalize_replicated(updates, coefficients, steps):
    """Every rank holds every update (one process, or DDP): with several ranks, matrix i is orthogonalized by rank
    i % world and broadcast from there, so the work is split evenly and no rank skips a matrix."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return orthogonalize_stacked(updates, coefficients, steps)
    rank, world = dist.get_rank(), dist.get_world_size()
    out = [orthogonalize(u, coefficients, steps) if i % world == rank else torch.empty_like(u)
           for i, u in enumerate(updates)]
    for handle in [dist.broadcast(o, src=i % world, async_op=True) for i, o in enumerate(out)]:
        handle.wait()
    return out


def orthogonalize_sharded(updates, shapes, coefficients, steps):
    """FSDP2: rank r holds rows [r c, (r + 1) c) of each matrix (c = ceil(rows / world)). Matrix i is gathered to
    rank i % world, orthogonalized whole there and its rows scattered back, so each rank orthogonalizes 1/world of
    the matrices. Stacked expert weights are sharded by expert, each expert's matrix whole on one rank: those are
    orthogonalized where they are, with no communication."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    for i, (u, shape) in enumerate(zip(updates, shapes)):
        if len(shape) >= 3:
            out.append(orthogonalize(u, coefficients, steps))
            continue
        owner, rows = i % world, -(-shape[0] // world)
        padded = u.new_zeros((rows,) + tuple(shape[1:]))
        padded[:len(u)] = u
        pieces = [torch.empty_like(padded) for _ in range(world)] if rank == owner else None
        dist.gather(padded, pieces, dst=owner)
        if rank == owner:
            full = orthogonalize(torch.cat(pieces)[:shape[0]], coefficients, steps)
            pieces = list(torch.cat((full, full.new_zeros((rows * world - shape[0],) + tuple(shape[1:])))).split(rows))
        dist.scatter(padded, pieces, src=owner)
        out.append(padded[:len(u)])
    return out


class Muon(torch.optim.Optimizer):
    """Muon for the groups of kind 'muon' (hidden matrices; stacked expert weights, each expert its own matrix),
    AdamW for the others (embedding, head, router, vectors: the orthogonal step suits hidden matrices only). One
    optimizer, so one state_dict for checkpoints (FSDP2's sharded ones too) and one schedule for every group.

    For a matrix W (m x n) with gradient G: B <- mu B + (1 - mu) G; U = (1 - mu) G + mu B (Nesterov) or U = B;
    O = orthogonalize(U), rows optionally balanced (NorMuon); W <- W (1 - lr wd) - lr 0.2 sqrt(max(m, n)) O.
    State: one momentum buffer per matrix (plus a row vector with NorMuon); AdamW's two moments elsewhere.
    row_parts: {parameter: n} for weights that stack n matrices along their rows (a SwiGLU expert's [gate; up]):
    each part is orthogonalized, balanced and scaled as a matrix of its own, as the dense MLP's gate and up are."""

    def __init__(self, groups, betas=(0.9, 0.95), eps=1e-8, momentum=0.95, nesterov=True, ns_steps=5,
                 coefficients="quintic", normalize=False, normalize_beta2=0.95, row_parts=None):
        if coefficients not in NEWTON_SCHULZ:
            raise ValueError(f"muon coefficients must be one of {', '.join(map(repr, NEWTON_SCHULZ))}")
        super().__init__(groups, dict(betas=betas, eps=eps, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      coefficients=coefficients, normalize=normalize, normalize_beta2=normalize_beta2))
        self.row_parts = row_parts or {}  # not optimizer state: rebuilt from the model, so resumes need nothing

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self.adamw_step(group)
        muon = [(p, g) for g in self.param_groups if g["kind"] == "muon" for p in g["params"] if p.grad is not None]
        if muon:
            self.muon_step(muon)

    def adamw_step(self, group):
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state.update(step=torch.zeros((), dtype=torch.float32), exp_avg=torch.zeros_like(p),
                             exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1  # a CPU tensor, so the bias corrections below need no device sync
            step = state["step"]
            p.mul_(1 - group["lr"] * group["weight_decay"])
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (state["exp_avg_sq"] / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
            p.addcdiv_(state["exp_avg"] / (1 - beta1 ** step), denom, value=-group["lr"])

    def matrix_shape(self, p):
        """p's global shape with stacked matrices apart: (..., n, m, k) for n matrices of m rows, else p.shape."""
        parts = self.row_parts.get(p, 1)
        return p.shape if parts == 1 else (*p.shape[:-2], parts, p.shape[-2] // parts, p.shape[-1])

    def split_rows(self, p, t):
        """t (p's local shard, its gradient or state) as a view in matrix_shape's layout."""
        parts = self.row_parts.get(p, 1)
        return t.unflatten(-2, (parts, -1)) if parts > 1 else t

    def muon_step(self, params):
        updates, shapes = [], []
        for p, group in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
                if group["normalize"]:
                    state["row_second_moment"] = torch.zeros_like(p[..., :1])
            buf, grad, mu = local(state["momentum_buffer"]), local(p.grad), group["momentum"]
            buf.lerp_(grad, 1 - mu)
            update = self.split_rows(p, grad.lerp(buf, mu) if group["nesterov"] else buf.clone())
            updates.append(update)
            shapes.append(self.matrix_shape(p))
        first = params[0][1]  # one Newton-Schulz table and step count for every Muon group
        coefficients, steps = NEWTON_SCHULZ[first["coefficients"]], first["ns_steps"]
        sharded = hasattr(params[0][0], "to_local")
        orthogonal = (orthogonalize_sharded(updates, shapes, coefficients, steps) if sharded
                      else orthogonalize_replicated(updates, coefficients, steps))
        if first["normalize"]:  # NorMuon is one setting for every Muon group
            balanced = [balance_rows(o, self.split_rows(p, local(self.state[p]["row_second_moment"])),
                                     group["normalize_beta2"])
                        for o, (p, group) in zip(orthogonal, params)]
            orthogonal = restore_norms(orthogonal, balanced, shapes, sharded)
        for (p, group), o, shape in zip(params, orthogonal, shapes):
            weights = local(p)
            weights.mul_(1 - group["lr"] * group["weight_decay"])
            weights.add_(o.reshape(weights.shape).to(weights.dtype), alpha=-group["lr"] * update_scale(shape))


def stacked_matrices(model):
    """{parameter: 2} for each SwiGLU expert weight that holds its gate and up matrices stacked along the rows."""
    return {m.w_up: 2 for m in model.modules() if isinstance(m, MoE) and m.cfg.mlp == "swiglu"}


def build_optimizer(name, model, lr, weight_decay, betas, lr_scales, device_type, muon=None):
    """The optimizer `name` over the named groups; muon: Muon's keyword settings (momentum, nesterov, ns_steps,
    coefficients, normalize, normalize_beta2)."""
    groups = param_groups(model, lr, weight_decay, lr_scales)
    if name == "adamw":
        return torch.optim.AdamW(groups, betas=betas, fused=device_type == "cuda")
    if name == "muon":
        for g in groups:
            g["kind"] = "muon" if g["name"] in MUON_GROUPS else "adamw"
        return Muon(groups, betas=betas, row_parts=stacked_matrices(model), **(muon or {}))
    raise ValueError(f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}, got {name!r}")


def state_bytes(name, model, normalize=False):
    """Bytes of optimizer state for the whole model (the memory plan shards it under FSDP): AdamW's two fp32
    moments per parameter; Muon's one buffer per matrix (plus a row vector with NorMuon), AdamW's two elsewhere."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}, got {name!r}")
    total = 0
    for param_name, p in model.named_parameters():
        if not p.requires_grad:  # frozen (a LoRA run's base): no state
            continue
        if name == "muon" and group_of(param_name, p) in MUON_GROUPS:
            total += 4 * p.numel() + (4 * p.numel() // p.shape[-1] if normalize else 0)
        else:
            total += 8 * p.numel()
    return total


def load_optimizer_state(optimizer, state):
    """Load a saved optimizer state but keep this run's group settings (lr multipliers, weight decay, Muon's
    settings): a resumed run follows its config, not the checkpoint's. A different group layout is refused."""
    saved = [g.get("name") for g in state["param_groups"]]
    ours = [g["name"] for g in optimizer.param_groups]
    kinds = [[g.get("kind") for g in groups] for groups in (state["param_groups"], optimizer.param_groups)]
    if saved != ours or kinds[0] != kinds[1]:
        raise ValueError(f"the checkpoint's optimizer has other parameter groups or another optimizer than this run "
                         f"({saved}): start a new phase from its weights with init_from=<ckpt.pt> instead")
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, ours in zip(optimizer.param_groups, settings):
        group.update({k: v for k, v in ours.items() if k != "lr"})


# ------------------------------------------------------------------------------------------------------ schedule

def scheduled_lr(it, schedule, lr, min_lr, warmup_iters, decay_iters, wsd_decay_frac=0.2, wsd_shape="linear"):
    """Base learning rate at iteration `it`: a linear warmup over warmup_iters, then
        cosine    cosine decay to min_lr at decay_iters
        linear    linear decay to min_lr at decay_iters
        constant  lr to the end
        wsd       warmup-stable-decay: lr until the last wsd_decay_frac of decay_iters, then down to min_lr in the
                  wsd_shape 'linear', 'cosine' or '1-sqrt' (Hagele et al. 2024)
    and min_lr from decay_iters on (except 'constant')."""
    if schedule != "constant" and it >= decay_iters:
        return min_lr
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    if schedule == "constant":
        return lr
    if schedule == "wsd":
        decay_start = max(warmup_iters, int(decay_iters * (1 - wsd_decay_frac)))
        if it < decay_start:
            return lr
        done = (it - decay_start) / (decay_iters - decay_start)
        left = {"linear": 1 - done, "cosine": 0.5 * (1 + math.cos(math.pi * done)), "1-sqrt": 1 - math.sqrt(done)}
        return min_lr + (lr - min_lr) * left[wsd_shape]
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    if schedule == "linear":
        return min_lr + (lr - min_lr) * (1 - ratio)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def scheduled_momentum(it, start, end, warmup_iters):
    """Muon's momentum: linear from start to end over the first warmup_iters (modded-nanogpt: 0.85 -> 0.95)."""
    return end if it >= warmup_iters else start + (end - start) * it / warmup_iters


def set_lr(optimizer, lr, momentum=None):
    """Every group at its multiplier times the base lr; Muon's groups also at the given momentum."""
    for group in optimizer.param_groups:
        group["lr"] = group["lr_scale"] * lr
        if momentum is not None and group.get("kind") == "muon":
            group["momentum"] = momentum
