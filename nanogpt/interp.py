"""Looking inside the model: named hook points read with run_with_cache and written with a patch, and the
computations behind interp.py's views (attention entropy, logit lens, activation patching, direct logit attribution,
induction scores, MoE routing).

Hook points of layer i (B sequences of T tokens; H query heads, K K/V heads, D head_dim, E experts, k active):
    blocks.i.resid_pre, resid_mid, resid_post   (B, T, n_embd)  the residual stream before attention, after
                                                                attention, after the MLP
    blocks.i.attn_out, mlp_out                  (B, T, n_embd)  what attention and the MLP (or MoE) add to it
    blocks.i.attn.q                             (B, H, T, D)    queries after q_norm and RoPE
    blocks.i.attn.k, attn.v                     (B, K, T, D)    keys after k_norm and RoPE, values after the value
                                                                embedding's mix; K/V producers only: a consumer
                                                                layer attends to its producer's (kv_producer)
    blocks.i.attn.pattern                       (B, H, T, T)    softmax weights (query, key), zero outside the window
    blocks.i.attn.z                             (B, H, T, D)    each head's output, before o_proj
    blocks.i.mlp.router_scores                  (B, T, E)       sigmoid router scores           (MoE layers)
    blocks.i.mlp.chosen                         (B, T, k)       the chosen experts' ids         (MoE layers)
    blocks.i.mlp.experts                        (B, T, n_embd)  the chosen experts' gated sum, before the shared ones

The model calls `module.hook(name, tensor)` at each point when a hook is installed (model.py; None otherwise, which
costs one check per point). The pattern exists only when asked for: SDPA and the Triton kernel never form it, so on
that layer attention then runs as softmax(q k^T / sqrt(D) + mask) @ v in at least fp32. A cache holds each point's
value after any patch on it.
"""
import difflib
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from model import Attention, MoE, attend
from nanokernels.mask import attention_mask

BLOCK_POINTS = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
ATTN_POINTS = ("q", "k", "v", "pattern", "z")
MOE_POINTS = ("router_scores", "chosen", "experts")


def kv_producer(model, layer):
    """The layer whose K/V `layer` attends to (itself for a producer)."""
    group = model.blocks[layer].attn.kv_group
    return next(i for i, b in enumerate(model.blocks) if b.attn.kv_group == group and b.attn.produces_kv)


def hook_names(model):
    """Every hook point of this model, in forward order."""
    names = []
    for i, block in enumerate(model.blocks):
        # an MLA layer (model.MLA) has no per-head q/k/v to hook: its residual points only
        attn = ([p for p in ATTN_POINTS if block.attn.produces_kv or p not in ("k", "v")]
                if isinstance(block.attn, Attention) else [])
        moe = MOE_POINTS if isinstance(block.mlp, MoE) else ()
        names += ([f"blocks.{i}.resid_pre"] + [f"blocks.{i}.attn.{p}" for p in attn]
                  + [f"blocks.{i}.{p}" for p in ("attn_out", "resid_mid")] + [f"blocks.{i}.mlp.{p}" for p in moe]
                  + [f"blocks.{i}.{p}" for p in ("mlp_out", "resid_post")])
    return names


def check_hook_names(model, names):
    """ValueError (one line, with the nearest real names) for a name that is not a hook point of this model."""
    known = hook_names(model)
    for name in names:
        if name in known:
            continue
        parts = name.split(".")
        if len(parts) == 4 and parts[2:4] in (["attn", "k"], ["attn", "v"]) and parts[1].isdigit() \
                and int(parts[1]) < len(model.blocks):
            producer = kv_producer(model, int(parts[1]))
            raise ValueError(f"unknown hook point {name!r}: layer {parts[1]} has no K/V of its own, it attends to "
                             f"layer {producer}'s (blocks.{producer}.attn.{parts[3]})")
        near = difflib.get_close_matches(name, known, n=4, cutoff=0.5)
        hint = f"near ones: {', '.join(near)}" if near else f"names look like {known[0]} ... {known[-1]}"
        raise ValueError(f"unknown hook point {name!r}; {hint} (interp.py --view=names lists them all)")


def repeat_kv(x, n_head):
    """(B, K, T, D) -> (B, n_head, T, D): query head h reads K/V head h // (n_head / K), as SDPA's enable_gqa."""
    return x.repeat_interleave(n_head // x.size(1), dim=1)


def attention_pattern(q, k, window):
    """softmax(q k^T / sqrt(D)) under the causal (and window) rule, (B, H, Tq, Tk), in at least fp32; queries are
    the last Tq of the Tk positions."""
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = q.to(acc) @ repeat_kv(k, q.size(1)).to(acc).transpose(-1, -2) / math.sqrt(q.size(-1))
    visible = attention_mask(q.size(2), k.size(2), window, q.device)
    return scores.masked_fill(~visible, float("-inf")).softmax(-1)


class PointHook:
    """What a module's `hook` holds while hooks are installed: hook(name, x) -> x, and attention with its pattern."""

    def __init__(self, hooks, prefix):
        self.hooks, self.prefix = hooks, prefix

    def __call__(self, name, x):
        return self.hooks.visit(self.prefix + name, x)

    def attend(self, q, k, v, window, impl, dropout):
        if self.prefix + "pattern" in self.hooks.wanted:
            pattern = self("pattern", attention_pattern(q, k, window))
            y = F.dropout(pattern, dropout).to(v.dtype) @ repeat_kv(v, q.size(1))
        else:
            y = attend(q, k, v, window, impl, dropout)
        return self("z", y)


class Hooks:
    """The points to record (cache) and to overwrite (patches: {name: tensor, or function(x) -> new x})."""

    def __init__(self, cache_names, patches):
        self.cache_names, self.patches, self.cache = set(cache_names), dict(patches), {}
        self.wanted = self.cache_names | set(self.patches)

    def visit(self, name, x):
        if name not in self.wanted:
            return x
        patch = self.patches.get(name)
        if callable(patch):
            x = patch(x)
        elif patch is not None:
            if patch.shape != x.shape:
                raise ValueError(f"patch for {name} has shape {tuple(patch.shape)}, the point has {tuple(x.shape)}")
            x = patch.to(x.device, x.dtype)
        if name in self.cache_names:
            self.cache[name] = x.detach()
        return x


@contextmanager
def hooked(model, cache=(), patches=None):
    """Hook points installed on model inside the block: yields the dict that fills with the `cache` names' values
    as the model runs; `patches` {name: tensor or function} overwrite points. Removed on exit."""
    patches = patches or {}
    check_hook_names(model, [*cache, *patches])
    hooks = Hooks(cache, patches)
    modules = []
    for i, block in enumerate(model.blocks):
        for module, prefix in ((block, f"blocks.{i}."), (block.attn, f"blocks.{i}.attn."),
                               (block.mlp, f"blocks.{i}.mlp.")):
            if hasattr(module, "hook"):  # (a dense MLP has no points of its own)
                module.hook = PointHook(hooks, prefix)
                modules.append(module)
    try:
        yield hooks.cache
    finally:
        for module in modules:
            module.hook = None


@torch.no_grad()
def run_with_cache(model, idx, names=(), patches=None):
    """(logits (B, T, V) in at least fp32, {name: value}) of one forward of idx (B, T) with the named points
    recorded and `patches` applied."""
    with hooked(model, names, patches) as cache:
        logits = model.logits(model(idx))
    return logits, cache


# ------------------------------------------------------------------------------------------------------ attention

def entropy(p, dim=-1):
    """Shannon entropy in nats along dim (0 log 0 = 0)."""
    return -(p * p.clamp(min=1e-30).log()).sum(dim)


def attention_maps(model, idx):
    """{layer: (H, T, T) pattern of sequence 0}, and (layers, H) mean entropy over queries, for idx (1, T)."""
    names = [f"blocks.{i}.attn.pattern" for i in range(len(model.blocks))]
    _, cache = run_with_cache(model, idx, names)
    patterns = [cache[n][0].float() for n in names]
    return patterns, torch.stack([entropy(p).mean(-1) for p in patterns])


# -------------------------------------------------------------------------------------------------- logit lens

def logit_lens(model, idx):
    """(layers + 1, B, T, V) logits of the final norm and head applied to the residual stream after the embedding
    and after each layer; the last row is the model's own logits."""
    L = len(model.blocks)
    names = ["blocks.0.resid_pre"] + [f"blocks.{i}.resid_post" for i in range(L)]
    _, cache = run_with_cache(model, idx, names)
    with torch.no_grad():
        return torch.stack([model.logits(model.norm(cache[n])) for n in names])


# -------------------------------------------------------------------------------------------- activation patching

def logit_diff(logits, target, foil):
    """logit[target] - logit[foil] at the last position, per sequence."""
    return logits[:, -1, target] - logits[:, -1, foil]


def patch_sweep(model, clean_idx, corrupt_idx, name, rows):
    """Logits of the corrupted prompt repeated `rows` times, row r given the clean value of `name` at index r of
    its second axis: position r of the residual points, head r (every position) of attn.z."""
    _, clean = run_with_cache(model, clean_idx, [name])
    r = torch.arange(rows, device=clean_idx.device)

    def patch(x):
        x = x.clone()
        x[r, r] = clean[name][0, r]
        return x
    return run_with_cache(model, corrupt_idx.expand(rows, -1), patches={name: patch})[0]


def activation_patching(model, clean_idx, corrupt_idx, target, foil):
    """Recovered fraction of the clean-vs-corrupted logit difference, (patched - corrupted) / (clean - corrupted),
    for the clean activation put into the corrupted run: per (layer, position) for resid_pre, attn_out and mlp_out,
    and per (layer, head) for attn.z at every position. Returns ({point: (layers, T or H)}, clean ld, corrupt ld)."""
    if clean_idx.shape != corrupt_idx.shape:
        raise ValueError(f"patching needs prompts of equal length in tokens: the clean one has {clean_idx.size(1)}, "
                         f"the corrupted one {corrupt_idx.size(1)}; make them the same length")
    clean_ld = logit_diff(run_with_cache(model, clean_idx)[0], target, foil)[0].item()
    corrupt_ld = logit_diff(run_with_cache(model, corrupt_idx)[0], target, foil)[0].item()
    if abs(clean_ld - corrupt_ld) < 1e-6:
        raise ValueError(f"the clean and corrupted prompts give the same logit difference ({clean_ld:.4g}): "
                         "choose prompts (or --target/--foil) whose answers differ")
    L, T, H = len(model.blocks), clean_idx.size(1), model.config.n_head
    results = {}
    for point, rows in (("resid_pre", T), ("attn_out", T), ("mlp_out", T), ("attn.z", H)):
        lds = [logit_diff(patch_sweep(model, clean_idx, corrupt_idx, f"blocks.{i}.{point}", rows), target, foil)
               for i in range(L)]
        results[point] = ((torch.stack(lds) - corrupt_ld) / (clean_ld - corrupt_ld)).cpu()
    return results, clean_ld, corrupt_ld


# ---------------------------------------------------------------------------------------- direct logit attribution

def head_results(model, layer, z):
    """(..., H, n_embd): each head's share of attn_out, z (..., H, D) through its columns of o_proj."""
    H, D = model.config.n_head, model.config.head_dim
    w = model.blocks[layer].attn.o_proj.weight.view(-1, H, D)           # (n_embd, H, D)
    return torch.einsum("...hd,ehd->...he", z, w.to(z.dtype))


@torch.no_grad()
def direct_logit_attribution(model, idx, target, foil=None):
    """Each component's direct contribution to logit[target] (- logit[foil]) at the last position of idx (1, T),
    before the softcap. The final RMSNorm is h = s * w * x with s = 1 / sqrt(mean(x^2) + eps) of the final residual
    x; with s frozen at this run's value the head is linear in x, and x = embedding + every head's o_proj share +
    every MLP output, so the contributions sum to the (pre-softcap) logit exactly. What the freeze hides: a
    component also changes s, which scales every contribution (that is not attributed).
    Returns {embed, heads (layers, H), mlps (layers), total, logit, scale}."""
    L = len(model.blocks)
    names = (["blocks.0.resid_pre", f"blocks.{L - 1}.resid_post"] + [f"blocks.{i}.attn.z" for i in range(L)]
             + [f"blocks.{i}.mlp_out" for i in range(L)])
    _, cache = run_with_cache(model, idx, names)
    x = cache[f"blocks.{L - 1}.resid_post"][0, -1].double()
    scale = torch.rsqrt(x.square().mean() + model.norm.eps)
    w_u = model.lm_head.weight.double()
    direction = w_u[target] - (w_u[foil] if foil is not None else 0)
    read = scale * model.norm.weight.double() * direction                 # d logit / d component, s frozen
    heads = torch.stack([head_results(model, i, cache[f"blocks.{i}.attn.z"][0, :, -1].double()) @ read
                         for i in range(L)])
    mlps = torch.stack([cache[f"blocks.{i}.mlp_out"][0, -1].double() @ read for i in range(L)])
    embed = cache["blocks.0.resid_pre"][0, -1].double() @ read
    logit = model.norm(x.to(model.norm.weight.dtype)).double() @ direction
    return {"embed": embed.item(), "heads": heads, "mlps": mlps, "total": (embed + heads.sum() + mlps.sum()).item(),
            "logit": logit.item(), "scale": scale.item()}


# ------------------------------------------------------------------------------------------------ induction heads

def repeated_random_tokens(n_seqs, length, vocab_size, generator):
    """(n_seqs, 2 length): random tokens, then the same again."""
    first = torch.randint(0, vocab_size, (n_seqs, length), generator=generator)
    return torch.cat([first, first], dim=1)


@torch.no_grad()
def induction_scores(model, idx):
    """(induction, previous-token) scores (layers, H) on idx = repeated_random_tokens: the mean attention from each
    query in the second half to the token after its first occurrence (i - length + 1), and from each query i >= 1 to
    i - 1. Also the mean loss on the first and second halves (a model that copies does better on the second)."""
    L, n = len(model.blocks), idx.size(1) // 2
    logits, cache = run_with_cache(model, idx, [f"blocks.{i}.attn.pattern" for i in range(L)])
    q = torch.arange(n, 2 * n)
    p = torch.arange(1, 2 * n)
    induction, previous = [], []
    for i in range(L):
        pattern = cache[f"blocks.{i}.attn.pattern"].float()
        induction.append(pattern[:, :, q, q - n + 1].mean((0, 2)))
        previous.append(pattern[:, :, p, p - 1].mean((0, 2)))
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten(), reduction="none").view(len(idx), -1)
    return torch.stack(induction).cpu(), torch.stack(previous).cpu(), (losses[:, :n - 1].mean().item(),
                                                                       losses[:, n:].mean().item())


# ---------------------------------------------------------------------------------------------------- MoE routing

@torch.no_grad()
def routing_stats(model, tokens, seq_len, batch_size=8):
    """Routing of a token stream (1-D tensor) cut into rows of seq_len: per MoE layer {load (E) fraction of routed
    slots, entropy (mean over tokens of the router's scores normalised to sum 1, in nats), counts (E, vocab) of
    token id -> expert}."""
    layers = [i for i, b in enumerate(model.blocks) if isinstance(b.mlp, MoE)]
    if not layers:
        raise ValueError("this model has no MoE layers (n_expert = 0): the moe view needs one")
    E, V = model.config.n_expert, model.config.vocab_size
    rows = tokens[:len(tokens) // seq_len * seq_len].view(-1, seq_len)
    if not len(rows):
        raise ValueError(f"{len(tokens)} tokens are fewer than one row of {seq_len}")
    stats = {i: {"counts": torch.zeros(E, V, dtype=torch.long), "entropy": 0.0} for i in layers}
    names = [f"blocks.{i}.mlp.{p}" for i in layers for p in ("router_scores", "chosen")]
    device = next(model.parameters()).device
    for start in range(0, len(rows), batch_size):
        idx = rows[start:start + batch_size].to(device)
        _, cache = run_with_cache(model, idx, names)
        for i in layers:
            scores, chosen = cache[f"blocks.{i}.mlp.router_scores"], cache[f"blocks.{i}.mlp.chosen"]
            stats[i]["entropy"] += entropy(scores / scores.sum(-1, keepdim=True)).sum().item()
            pairs = chosen.cpu() * V + idx.cpu()[..., None]                  # expert * V + token id
            stats[i]["counts"] += torch.bincount(pairs.flatten(), minlength=E * V).view(E, V)
    for s in stats.values():
        s["load"] = s["counts"].sum(1) / s["counts"].sum()
        s["entropy"] /= rows.numel()
    return stats
