"""LoRA (Hu et al. 2021): fine-tune a frozen model through low-rank adapters on chosen weight matrices.

A targeted weight W (out, in) computes W x + (alpha / rank) B A dropout(x), with A (rank, in) random and B (out, rank)
zero at the start, so the adapted model starts as exactly the base model. Only A and B train; the base stays frozen
and out of the optimizer and of the checkpoint. Targets are linear layers in the blocks, chosen by name patterns
(`lora_targets`, comma-separated fnmatch globs: a pattern without a '.' matches a layer's own name, e.g. 'q_proj' or
'*_proj'; one with dots the full name, e.g. 'blocks.3.*'). Every pattern must match a layer. The embedding, the head
and the routers are never adapted (the head computes the chunked loss; the router only picks experts).

Routed experts (model.py's MoE) keep their weights stacked, (n_expert, out, in), and run through three dispatch paths
(grouped matmul, per-expert loop, dense); their adapters (`lora_experts=True`) therefore add their low-rank update to
the weight itself, W_e + (alpha / rank) B_e A_e for each expert e (a torch parametrization: every path sees the
adapted weight), one rank-`rank` adapter per expert and per matrix (a SwiGLU expert's stacked [gate; up] gets one for
gate and one for up, as the dense MLP does). Dropout cannot act on an update added to a weight, so lora_dropout applies
to the linear layers only.

The checkpoint of a LoRA run holds the adapters and the model's buffers (an MoE layer's routing bias keeps adapting
while its experts are frozen), `lora` (rank, alpha, targets, experts) and a pointer to the base: `lora_base`, the
checkpoint it started from, and `lora_base_fingerprint`, the sha256 of the base weights (nanogpt/checkpoint.py
weights_fingerprint). `checkpoint.read_checkpoint` returns such a checkpoint with the adapters merged into the base's
weights, so sample.py, chat.py, the evaluations, tools/export_hf.py and new phases see an ordinary model;
`python tools/merge.py --method=lora --models=out-lora` writes the merged ckpt.pt.
"""
import fnmatch
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from model import MoE

ADAPTER_PARAMS = ("lora_A", "lora_B")
SPEC_KEYS = ("rank", "alpha", "targets", "experts")  # what the adapters' shapes and function depend on


class LoRALinear(nn.Module):
    """A frozen linear layer (nn.Linear, or fp8's Float8Linear: the base matmul keeps its precision) plus its
    adapter, which runs in the layer's input dtype (or the autocast dtype)."""

    def __init__(self, base, rank, alpha, dropout, generator=None):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        device = base.weight.device
        # A as nn.Linear initialises its weight (kaiming uniform, a=sqrt(5)); B zero: the update starts at zero
        bound = 1 / math.sqrt(base.in_features)
        a = torch.rand(rank, base.in_features, generator=generator) * 2 * bound - bound
        self.lora_A = nn.Parameter(a.to(device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))

    def forward(self, x):
        return self.base(x) + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

    def delta(self):
        return self.scale * self.lora_B @ self.lora_A


class ExpertDelta(nn.Module):
    """The parametrization of stacked expert weights W (E, out, in): W + scale B A per expert, with `parts` adapters
    stacked along the rows (2 for SwiGLU's [gate; up])."""

    def __init__(self, weight, rank, alpha, parts, generator=None):
        super().__init__()
        E, out, inp = weight.shape
        self.scale, self.parts = alpha / rank, parts
        bound = 1 / math.sqrt(inp)
        a = torch.rand(E, parts, rank, inp, generator=generator) * 2 * bound - bound
        self.lora_A = nn.Parameter(a.to(weight.device))
        self.lora_B = nn.Parameter(torch.zeros(E, parts, out // parts, rank, device=weight.device))

    def delta(self):
        E, parts, rows, _ = self.lora_B.shape
        return self.scale * (self.lora_B @ self.lora_A).reshape(E, parts * rows, -1)

    def forward(self, weight):
        return weight + self.delta().to(weight.dtype)


# ------------------------------------------------------------------------------------------------ choosing targets

def linear_layers(model):
    """{full name: module} of the linear layers LoRA may adapt: those in the blocks, routers excepted."""
    return {name: m for name, m in model.blocks.named_modules(prefix="blocks")
            if isinstance(m, nn.Linear) and not name.endswith("router")}


def matches(pattern, name):
    return fnmatch.fnmatchcase(name if "." in pattern else name.rsplit(".", 1)[-1], pattern)


def choose_targets(model, targets):
    """The names of the linear layers the comma-separated patterns `targets` match. A ValueError (one line) when a
    pattern matches none."""
    layers = linear_layers(model)
    patterns = [p.strip() for p in targets.split(",") if p.strip()]
    if not patterns:
        raise ValueError("config error: lora_targets names no layers: give name patterns, e.g. "
                         "--lora_targets=q_proj,v_proj or '*_proj'")
    for p in patterns:
        if not any(matches(p, name) for name in layers):
            kinds = sorted({name.rsplit(".", 1)[-1] for name in layers})
            raise ValueError(f"config error: lora_targets pattern {p!r} matches no linear layer of this model; its "
                             f"layers are {', '.join(kinds)} (e.g. --lora_targets=q_proj,v_proj or '*_proj')")
    return [name for name in layers if any(matches(p, name) for p in patterns)]


def set_module(model, name, module):
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


# ------------------------------------------------------------------------------------------ attaching and merging

def attach(model, rank, alpha, dropout, targets, experts=False, seed=0):
    """Freeze `model` and add adapters in place on the layers `targets` matches (and on every MoE layer's routed
    experts with `experts`); the same adapters on every rank for the same seed. Returns the names adapted."""
    if rank < 1:
        raise ValueError(f"config error: lora_rank must be >= 1 to attach adapters, got {rank}")
    if experts and not model.moe_layers():
        raise ValueError("config error: lora_experts=True but this model has no routed experts: drop it")
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    names = choose_targets(model, targets)
    for name in names:
        set_module(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout, generator))
    if experts:
        for i, block in enumerate(model.blocks):
            if isinstance(block.mlp, MoE):
                parts = {"w_up": 2 if block.mlp.cfg.mlp == "swiglu" else 1, "w_down": 1}
                for weight, n in parts.items():
                    delta = ExpertDelta(getattr(block.mlp, weight), rank, alpha, n, generator)
                    parametrize.register_parametrization(block.mlp, weight, delta)
                    names.append(f"blocks.{i}.mlp.{weight}")
    model.lora = dict(rank=rank, alpha=alpha, dropout=dropout, targets=targets, experts=experts)
    return names


def is_adapter(name):
    return name.rsplit(".", 1)[-1] in ADAPTER_PARAMS


def adapter_state(model):
    """What a LoRA run saves: the adapters and the model's persistent buffers (MoE routing biases)."""
    state = {k: v for k, v in model.state_dict().items() if is_adapter(k)}
    buffers = {name for name, _ in model.named_buffers()}
    return dict(state, **{k: v for k, v in model.state_dict().items() if k in buffers})


def load_adapter_state(model, state):
    """Load adapter_state's dict into a model with the same adapters attached; a ValueError names what differs."""
    ours = adapter_state(model)
    if set(ours) != set(state) or any(ours[k].shape != state[k].shape for k in ours):
        missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
        raise ValueError(f"the checkpoint's adapters do not fit this model's (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}, or other shapes)")
    model.load_state_dict(state, strict=False)


@torch.no_grad()
def merge(model):
    """Fold every adapter into its weight, in place, and remove the adapters: a plain GPT again, whose state_dict
    has the base model's names. Returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            module.base.weight += module.delta().to(module.base.weight.dtype)
            set_module(model, name, module.base)
    for moe in model.moe_layers():
        for weight in ("w_up", "w_down"):
            if parametrize.is_parametrized(moe, weight):
                parametrize.remove_parametrizations(moe, weight, leave_parametrized=True)
    model.requires_grad_(True)
    model.__dict__.pop("lora", None)
    return model


def describe(model, names):
    """One line: the layers adapted, trainable parameters against the whole model's."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
    spec = model.lora
    return (f"LoRA rank {spec['rank']}, alpha {spec['alpha']}, dropout {spec['dropout']} on {len(names)} weights "
            f"({', '.join(kinds)}): {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f}%)")


def optimizer_state_bytes(optimizer):
    """Bytes the optimizer's state tensors hold now (after a step: measured, not planned)."""
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if torch.is_tensor(t))


# ------------------------------------------------------------------------------------------- settings

def spec_of(config):
    return {"rank": config["lora_rank"], "alpha": config["lora_alpha"], "targets": config["lora_targets"],
            "experts": config["lora_experts"]}


def source_path(init_from):
    """init_from as a path that still names the base from another working directory."""
    if init_from.startswith("hf:"):
        return "hf:" + os.path.abspath(init_from[3:])
    return os.path.abspath(init_from)
