"""Merge checkpoints of one architecture into a new ckpt.pt that sample.py, the eval scripts and train.py load.

    python tools/merge.py --method=linear --models=out-a,out-b --out_dir=out-merged
    python tools/merge.py --method=slerp --models=out-a,out-b --t=0.5 --out_dir=out-merged
    python tools/merge.py --method=ties --models=out-a,out-b --base=out-base --weights=0.5,0.5 --out_dir=out-merged
    python tools/merge.py --method=lora --models=out-lora --out_dir=out-merged    # adapters folded into their base

A model is a run folder (its ckpt.pt, or the newest sharded step_N/), a ckpt.pt path, a step_N/ folder, or a Hugging
Face folder as hf:PATH. Every tensor is merged on its own, in float64, and stored in the first model's dtype.
With task vectors tau_i = model_i - base:

    linear            sum_i w_i model_i, the weights normalised to sum to 1 (a model soup; Wortsman et al. 2022)
    slerp             two models, per tensor: along the great circle between them at t (Shoemake 1985), or
                      linearly when they are nearly parallel (|cos| > 0.9995), as SLERP merges usually do
    task_arithmetic   base + sum_i w_i tau_i (Ilharco et al. 2023, "Editing models with task arithmetic")
    ties              trim each tau_i to its top `density` fraction by magnitude (per tensor; the paper trims the
                      whole flattened vector), elect each entry's sign as the sign of sum_i w_i tau_i, and add to
                      base the mean of the entries that agree with it, weighted by w_i (Yadav et al. 2023, TIES;
                      equal weights give the paper's disjoint mean)
    dare              drop each entry of tau_i with probability 1 - density, scale the rest by 1 / density (so its
                      expectation is tau_i), then task arithmetic (Yu et al. 2024, "Language Models are Super Mario")
    dare_ties         DARE's drop and rescale in place of TIES's trim, then TIES's sign election and mean
    lora              one LoRA run: its adapters merged into its base's weights (nanogpt/lora.py), a full ckpt.pt
"""
import os
import sys
from typing import Literal

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from configurator import configure, given, require  # noqa: E402
from model import GPTConfig  # noqa: E402
from nanogpt.checkpoint import (architecture, architecture_differences, clean_state_dict,  # noqa: E402
                                has_checkpoint, read_checkpoint, save_checkpoint)

METHODS = ("linear", "slerp", "task_arithmetic", "ties", "dare", "dare_ties", "lora")
TASK_VECTOR_METHODS = ("task_arithmetic", "ties", "dare", "dare_ties")
NEARLY_PARALLEL = 0.9995  # SLERP falls back to linear interpolation above this |cosine|

method: Literal[METHODS] = "linear"
models = ""                    # comma-separated: run folders, ckpt.pt paths, step_N/ folders or hf:PATH
base = ""                      # the common base model (needed by task_arithmetic, ties, dare, dare_ties)
weights: tuple | list = ()     # one per model, e.g. 0.7,0.3; () = equal (linear) or 1.0 each (task vectors)
t = 0.5                        # slerp: 0 = the first model, 1 = the second
density = 0.2                  # ties: fraction of each task vector kept; dare: probability of keeping an entry
seed = 0                       # dare: the random drops
out_dir = "out-merged"         # the merged ckpt.pt goes here
overwrite = False              # replace a checkpoint already in out_dir

# ------------------------------------------------------------------------------------------------ per tensor


def linear(tensors, weights):
    total = sum(weights)
    return sum(w / total * x for w, x in zip(weights, tensors))


def slerp(a, b, t):
    """Spherical interpolation of two tensors treated as flat vectors (their norms interpolate along with them)."""
    cos = torch.dot(a.flatten(), b.flatten()) / (a.norm() * b.norm())
    if not torch.isfinite(cos) or cos.abs() > NEARLY_PARALLEL:  # a zero tensor, or (anti)parallel ones
        return (1 - t) * a + t * b
    angle = torch.arccos(cos)
    return (torch.sin((1 - t) * angle) * a + torch.sin(t * angle) * b) / torch.sin(angle)


def task_arithmetic(base, tensors, weights):
    return base + sum(w * (x - base) for w, x in zip(weights, tensors))


def trim(tau, density):
    """tau with all but its round(density * numel) largest-magnitude entries set to zero."""
    keep = round(density * tau.numel())
    out = torch.zeros_like(tau)
    if keep:
        top = tau.flatten().abs().topk(keep).indices
        out.view(-1)[top] = tau.flatten()[top]
    return out


def drop_and_rescale(tau, density, generator):
    """DARE: each entry kept with probability density and scaled by 1 / density, so the expectation is tau."""
    kept = torch.rand(tau.shape, generator=generator, dtype=torch.float64) < density
    return torch.where(kept, tau / density, torch.zeros_like(tau))


def elect_and_merge(taus, weights):
    """TIES: the elected sign of each entry is that of sum_i w_i tau_i; the merge is the w-weighted mean of the
    entries whose sign agrees with it (zeros, trimmed or dropped, never agree); 0 where none does."""
    weighted = torch.stack([w * tau for w, tau in zip(weights, taus)])
    agree = torch.sign(torch.stack(taus)) == torch.sign(weighted.sum(0))
    agree &= torch.stack(taus) != 0
    w = torch.tensor(weights, dtype=weighted.dtype).view(-1, *[1] * taus[0].dim())
    total = (w * agree).sum(0)
    return torch.where(total != 0, (weighted * agree).sum(0) / total, torch.zeros_like(total))


def ties(base, tensors, weights, density):
    return base + elect_and_merge([trim(x - base, density) for x in tensors], weights)


def dare(base, tensors, weights, density, generator, with_ties=False):
    taus = [drop_and_rescale(x - base, density, generator) for x in tensors]
    return base + (elect_and_merge(taus, weights) if with_ties else sum(w * tau for w, tau in zip(weights, taus)))


def merge_tensor(method, tensors, base_tensor, weights, t, density, generator):
    """One tensor of the merged model, in float64."""
    tensors = [x.double() for x in tensors]
    b = base_tensor.double() if base_tensor is not None else None
    if method == "linear":
        return linear(tensors, weights)
    if method == "slerp":
        return slerp(*tensors, t)
    if method == "task_arithmetic":
        return task_arithmetic(b, tensors, weights)
    if method == "ties":
        return ties(b, tensors, weights, density)
    return dare(b, tensors, weights, density, generator, with_ties=method == "dare_ties")

# ------------------------------------------------------------------------------------------------ checkpoints


def vocabulary_difference(spec, other):
    """How two tokenizer specs differ, in words that tell them apart."""
    if spec["kind"] != other["kind"]:
        return f"a {spec['kind']} tokenizer vs a {other['kind']} one"
    if spec["kind"] == "char":
        a, b = spec["chars"], other["chars"]
        if len(a) != len(b):
            return f"{len(a)} characters vs {len(b)}"
        i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        return f"character vocabularies that differ at id {i} ({a[i]!r} vs {b[i]!r})"
    if spec["kind"] == "gpt2":
        return (f"GPT-2 BPE with special tokens {sorted(spec.get('special', {})) or 'none'} vs "
                f"{sorted(other.get('special', {})) or 'none'}")
    return f"the {spec.get('name', 'hf')} tokenizer vs {other.get('name', 'hf')} (their vocabularies differ)"


def check_same_architecture(ckpts, names):
    """A ValueError naming the first difference in architecture or vocabulary from the first model."""
    first, first_vocab = GPTConfig(**architecture(ckpts[0])), ckpts[0].get("tokenizer", {"kind": "gpt2"})
    for ckpt, name in zip(ckpts[1:], names[1:]):
        differ = architecture_differences(first, GPTConfig(**architecture(ckpt)))
        if differ:
            listed = ", ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in differ.items())
            raise ValueError(f"{name} is another architecture than {names[0]}: {listed}")
        vocab = ckpt.get("tokenizer", {"kind": "gpt2"})
        if vocab != first_vocab:
            raise ValueError(f"{name} has another vocabulary than {names[0]}: "
                             f"{vocabulary_difference(vocab, first_vocab)}")


def merge_checkpoints(method, model_ckpts, base_ckpt=None, weights=None, t=0.5, density=0.2, seed=0):
    """The merged state_dict (each tensor in the first model's dtype) of checkpoint dicts already checked."""
    states = [clean_state_dict(c["model"]) for c in model_ckpts]
    base_state = clean_state_dict(base_ckpt["model"]) if base_ckpt is not None else {}
    generator = torch.Generator().manual_seed(seed)
    merged = {}
    for name, first in states[0].items():  # one order on every run: DARE's draws are reproducible
        if not first.is_floating_point():
            merged[name] = first
            continue
        tensor = merge_tensor(method, [s[name] for s in states], base_state.get(name), weights, t, density, generator)
        merged[name] = tensor.to(first.dtype)
    return merged


def default_weights(method, n):
    return [1.0 / n] * n if method == "linear" else [1.0] * n


def merged_checkpoint(method, sources, base_source="", weights=None, t=0.5, density=0.2, seed=0):
    """Read, check and merge; a checkpoint dict ready for save_checkpoint."""
    if method == "lora":  # read_checkpoint merges a LoRA run's adapters into its base
        ckpt = read_checkpoint(sources[0])
        if "merged_from" not in ckpt:
            raise ValueError(f"{sources[0]} holds no LoRA adapters (lora_rank was 0): it is a full model already")
        merged_from = ckpt.pop("merged_from")
        return dict(ckpt, config={"merge": {"method": method, "models": sources, "base": merged_from["base"]}})
    ckpts = [read_checkpoint(s) for s in sources]
    base_ckpt = read_checkpoint(base_source) if base_source else None
    named = list(zip(ckpts, sources)) + ([(base_ckpt, base_source)] if base_ckpt else [])
    check_same_architecture(*zip(*named))
    weights = weights or default_weights(method, len(sources))
    state = merge_checkpoints(method, ckpts, base_ckpt, weights, t, density, seed)
    recipe = {"method": method, "models": sources, "base": base_source, "weights": weights, "t": t,
              "density": density, "seed": seed}
    return {"model": state, "model_args": ckpts[0]["model_args"], "config": {"merge": recipe}, "iter_num": 0,
            "tokenizer": ckpts[0].get("tokenizer", {"kind": "gpt2"})}


def check_settings(method, sources, base_source, weights, t, density):
    """One line for the first bad setting (via configurator.require)."""
    require(method == "lora" or len(sources) >= 2, f"--models needs at least two models, got {len(sources)}")
    require(method != "lora" or len(sources) == 1, f"--method=lora merges one LoRA run, got {len(sources)} models")
    require(method != "slerp" or len(sources) == 2, f"slerp merges exactly two models, got {len(sources)}")
    require(method not in TASK_VECTOR_METHODS or base_source, f"--method={method} needs --base (the common base model)")
    require(not weights or len(weights) == len(sources), f"--weights has {len(weights or ())} values for "
            f"{len(sources)} models")
    require(method != "linear" or sum(weights or [1]) != 0, "--weights must not sum to zero")
    require(0 <= t <= 1, f"t must be in [0, 1], got {t}")
    require(0 < density <= 1, f"density must be in (0, 1], got {density}")


def check_used(method, given_settings):
    """A setting the method never reads is an error, not a silent no-op."""
    used = {"linear": {"weights"}, "slerp": {"t"}, "task_arithmetic": {"base", "weights"},
            "ties": {"base", "weights", "density"}, "dare": {"base", "weights", "density", "seed"},
            "dare_ties": {"base", "weights", "density", "seed"}, "lora": set()}[method]
    unused = sorted((given_settings & {"base", "weights", "t", "density", "seed"}) - used)
    require(not unused, f"--method={method} does not use {', '.join('--' + k for k in unused)}: drop it or "
            "choose a method that uses it")


def main():
    configure(globals())
    sources = [s for s in models.split(",") if s]
    require(all(isinstance(w, (int, float)) for w in weights), f"--weights must be numbers, e.g. 0.7,0.3; "
            f"got {weights!r}")
    weight_list = [float(w) for w in weights] or None
    check_settings(method, sources, base, weight_list, t, density)
    check_used(method, given())
    require(overwrite or not has_checkpoint(out_dir), f"{out_dir} already holds a checkpoint: pass --overwrite=True "
            "or another --out_dir")
    try:
        ckpt = merged_checkpoint(method, sources, base, weight_list, t, density, seed)
        os.makedirs(out_dir, exist_ok=True)
        save_checkpoint(ckpt, os.path.join(out_dir, "ckpt.pt"))
    except (OSError, RuntimeError, ValueError) as e:  # a missing or unreadable model, a mismatch: one line
        raise SystemExit(str(e))
    print(f"merged {len(sources)} models ({method}) -> {os.path.join(out_dir, 'ckpt.pt')}")


if __name__ == "__main__":
    main()
