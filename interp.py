"""Look inside a trained model: attention maps, the logit lens, activation patching, direct logit attribution,
induction heads and MoE routing, as PNGs and a JSON per view under RUN/interp/ (docs/interpretability.md).

    python interp.py --out_dir=out --view=attention --prompt="ROMEO:"
    python interp.py --view=patching --prompt="KING HENRY" --corrupt="KING RICHA" --target=" " --foil=R
    python interp.py --view=all --corrupt=...    # every view whose inputs are given
    python interp.py --view=names                # the hook points (nanogpt/interp.py run_with_cache reads them)
"""
import os
from typing import Literal

import torch

from configurator import at_least, configure
from nanogpt import interp
from nanogpt.checkpoint import results_dir
from nanogpt.files import atomic_path, check_writable, write_json
from nanogpt.runtime import ATTN_IMPLS, DTYPE_SETTINGS, load_for_inference

VIEWS = ("attention", "logit_lens", "patching", "dla", "induction", "moe")
out_dir = "out"                # the model: a run folder, a ckpt.pt, step_N/ or hf:FOLDER; results go to RUN/interp/
view: Literal[(*VIEWS, "all", "names")] = "attention"  # 'all': every view whose inputs are given
prompt = "ROMEO:\nWhat light through yonder window breaks?"  # the (clean) prompt
corrupt = ""                   # patching: the corrupted prompt, as many tokens as --prompt
target = ""                    # logit_lens, patching, dla: one token; '' = the model's top next token after --prompt
foil = ""                      # the token target is compared with: patching '' = the corrupt run's top (or second); dla '' = none
n_repeat_tokens = 48           # induction: random tokens per half (the sequence is them twice)
n_repeat_seqs = 16             # induction: random sequences averaged over
data_root = "data"             # moe: the folder holding the dataset folders
dataset = "shakespeare_char"   # moe: its val shards are routed
moe_tokens = 16384             # moe: tokens routed (from the start of the val split)
top_tokens = 8                 # moe: tokens listed per expert
seed = 1337
device = "auto"                # 'auto' (cuda, else cpu), 'cpu', 'cuda'
dtype: Literal[DTYPE_SETTINGS] = "float32"  # the forward's dtype (float32: patterns and attributions to fp32 rounding)
attn_impl: Literal[ATTN_IMPLS] = "auto"  # layers without a requested pattern use this kernel
DEVICE = "cpu"                 # the resolved device (set by main)


def fail(message):
    raise SystemExit(f"interp.py: {message}")


# ------------------------------------------------------------------------------------------------------- inputs

def prompt_ids(tokenizer, text, setting, block_size):
    try:
        ids = tokenizer.encode(text)
    except ValueError as e:  # a character-level vocabulary meets a character it never saw
        fail(f"--{setting}: {e}")
    if not ids:
        fail(f"--{setting} encodes to no tokens: give it some text")
    if len(ids) > block_size:
        fail(f"--{setting} is {len(ids)} tokens, more than the model's block_size {block_size}: shorten it")
    return ids


def one_token(tokenizer, text, setting):
    ids = tokenizer.encode(text)
    if len(ids) != 1:
        fail(f"--{setting}={text!r} is {len(ids)} tokens ({ids}) for this tokenizer; give one token (GPT-2 BPE: "
             "words usually carry their leading space, e.g. ' Paris')")
    return ids[0]


def top_token(logits):
    return int(logits[0, -1].argmax())


# ------------------------------------------------------------------------------------------------------ output

class Output:
    """RUN/interp/: PNGs written through a temp file and a rename, one JSON per view."""

    def __init__(self, folder):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        check_writable(folder)
        self.written = []

    def png(self, fig, name):
        import matplotlib.pyplot as plt
        path = os.path.join(self.folder, name)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        self.written.append(path)

    def json(self, view_name, data):
        path = os.path.join(self.folder, f"{view_name}.json")
        write_json(path, {"view": view_name, "out_dir": out_dir, **data})
        self.written.append(path)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def token_labels(tokenizer, ids):
    return [repr(tokenizer.decode([i]))[1:-1] for i in ids]


def heatmap(ax, values, title, xlabels=None, ylabels=None, cmap="viridis", center=False, **kwargs):
    """values (rows, cols) on ax with a colour bar; center: a diverging map symmetric about 0."""
    values = torch.as_tensor(values, dtype=torch.float32)
    if center:
        bound = max(values.abs().max().item(), 1e-9)
        kwargs.update(vmin=-bound, vmax=bound)
        cmap = "RdBu_r"
    image = ax.imshow(values.numpy(), cmap=cmap, aspect="auto", interpolation="nearest", **kwargs)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    ax.set_title(title, fontsize=9)
    for labels, set_ticks, set_labels, rotation in ((xlabels, ax.set_xticks, ax.set_xticklabels, 90),
                                                    (ylabels, ax.set_yticks, ax.set_yticklabels, 0)):
        if labels is not None and len(labels) <= 64:
            set_ticks(range(len(labels)))
            set_labels(labels, fontsize=7, rotation=rotation)
    return image


def layer_label(model, i):
    """'3 L32 kv<-2': layer, kind (window), and whose K/V it attends to when not its own."""
    attn = model.blocks[i].attn
    kind = f"L{attn.window}" if attn.window else "G"
    producer = interp.kv_producer(model, i)
    return f"{i} {kind}" + (f" kv<-{producer}" if producer != i else "")


# ------------------------------------------------------------------------------------------------------- views

def view_attention(model, tokenizer, ids, out):
    plt = pyplot()
    idx = torch.tensor([ids], device=DEVICE)
    patterns, entropies = interp.attention_maps(model, idx)
    labels, H, T = token_labels(tokenizer, ids), model.config.n_head, len(ids)
    for i, pattern in enumerate(patterns):
        fig, axes = plt.subplots(1, H, figsize=(3.2 * H + 0.5, 3.6), squeeze=False)
        for h, ax in enumerate(axes[0]):
            heatmap(ax, pattern[h].cpu(), f"head {h} · entropy {entropies[i, h]:.2f}", labels, labels,
                    cmap="Blues", vmin=0, vmax=1)
            window = model.blocks[i].attn.window
            if window and window < T:  # keys left of the dashed line are outside the query's window
                ax.plot([-0.5, T - window - 0.5], [window - 0.5, T - 0.5], "r--", lw=0.8)
        fig.suptitle(f"layer {layer_label(model, i)} (rows: queries, columns: keys)", fontsize=10)
        fig.tight_layout()
        out.png(fig, f"attention_layer{i}.png")
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(entropies.mean(1).cpu().numpy(), "o-")
    ax.set_xticks(range(len(patterns)))
    ax.set_xticklabels([layer_label(model, i) for i in range(len(patterns))], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("entropy (nats), head mean")
    ax.set_title("attention entropy per layer (low: focused)", fontsize=9)
    fig.tight_layout()
    out.png(fig, "attention_entropy.png")
    out.json("attention", {"tokens": labels, "layers": [
        {"layer": i, "kind": "L" if model.blocks[i].attn.window else "G", "window": model.blocks[i].attn.window,
         "kv_producer": interp.kv_producer(model, i), "entropy_per_head": entropies[i].tolist(),
         "entropy_mean": entropies[i].mean().item()} for i in range(len(patterns))]})


def view_logit_lens(model, tokenizer, ids, out):
    plt = pyplot()
    idx = torch.tensor([ids], device=DEVICE)
    probs = interp.logit_lens(model, idx)[:, 0].softmax(-1).cpu()           # (layers + 1, T, V)
    goal = one_token(tokenizer, target, "target") if target else int(probs[-1, -1].argmax())
    rows = ["embed"] + [f"layer {i}" for i in range(len(model.blocks))]
    top_p, top_id = probs.max(-1)                                           # (layers + 1, T)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(ids) + 2), 0.45 * len(rows) + 1.6))
    heatmap(ax, top_p, "logit lens: top next token per layer and position (colour: its probability)",
            token_labels(tokenizer, ids), rows, vmin=0, vmax=1)
    if len(ids) <= 48:
        for r in range(len(rows)):
            for t in range(len(ids)):
                ax.text(t, r, token_labels(tokenizer, [top_id[r, t].item()])[0], ha="center", va="center",
                        fontsize=6, color="white" if top_p[r, t] < 0.5 else "black")
    fig.tight_layout()
    out.png(fig, "logit_lens.png")
    goal_p = probs[:, -1, goal]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(goal_p.numpy(), "o-")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(rows, fontsize=7, rotation=45)
    ax.set_ylabel(f"p({token_labels(tokenizer, [goal])[0]!r})")
    ax.set_title("probability of the target after the prompt, read at each layer", fontsize=9)
    fig.tight_layout()
    out.png(fig, "logit_lens_target.png")
    table = []
    for r, name in enumerate(rows):
        p, top = probs[r, -1].topk(5)
        table.append({"layer": name, "top": [[tokenizer.decode([i]), round(v, 4)] for i, v in
                                             zip(top.tolist(), p.tolist())],
                      "target_prob": goal_p[r].item(), "target_rank": int((probs[r, -1] > goal_p[r]).sum())})
    print(f"logit lens at the last position (target {tokenizer.decode([goal])!r}):")
    for row in table:
        print(f"  {row['layer']:>9}  p(target) {row['target_prob']:.3f} rank {row['target_rank']:>3}  top "
              + ", ".join(f"{t!r} {p:.2f}" for t, p in row["top"][:3]))
    out.json("logit_lens", {"tokens": token_labels(tokenizer, ids), "target": tokenizer.decode([goal]),
                            "last_position": table, "top1_per_position": [[tokenizer.decode([i]) for i in r]
                                                                          for r in top_id.tolist()]})


def view_patching(model, tokenizer, ids, out):
    plt = pyplot()
    bad = prompt_ids(tokenizer, corrupt, "corrupt", model.config.block_size)
    if len(bad) != len(ids):
        fail(f"patching needs prompts of equal length in tokens: --prompt is {len(ids)}, --corrupt is {len(bad)}; "
             "make them the same length")
    clean_idx, corrupt_idx = torch.tensor([ids], device=DEVICE), torch.tensor([bad], device=DEVICE)
    goal = one_token(tokenizer, target, "target") if target else top_token(interp.run_with_cache(model, clean_idx)[0])
    if foil:
        other = one_token(tokenizer, foil, "foil")
    else:
        ranked = interp.run_with_cache(model, corrupt_idx)[0][0, -1].argsort(descending=True).tolist()
        other = ranked[0] if ranked[0] != goal else ranked[1]
    if other == goal:
        fail("--target and --foil are the same token: patching measures the difference between two")
    try:
        results, clean_ld, corrupt_ld = interp.activation_patching(model, clean_idx, corrupt_idx, goal, other)
    except ValueError as e:
        fail(str(e))
    labels = [f"{a}/{b}" if a != b else a for a, b in zip(token_labels(tokenizer, ids), token_labels(tokenizer, bad))]
    layers = [layer_label(model, i) for i in range(len(model.blocks))]
    fig, axes = plt.subplots(2, 2, figsize=(max(10, 0.56 * len(ids) + 4), 2 * (0.4 * len(layers) + 2)))
    for ax, (point, what) in zip(axes.flat, (("resid_pre", "residual before layer"), ("attn_out", "attention output"),
                                        ("mlp_out", "MLP output"), ("attn.z", "each head, every position"))):
        xlabels = labels if point != "attn.z" else [f"h{h}" for h in range(model.config.n_head)]
        heatmap(ax, results[point], what, xlabels, layers, center=True)
    fig.suptitle(f"recovered fraction of logit[{tokenizer.decode([goal])!r}] - logit[{tokenizer.decode([other])!r}]"
                 f" (clean {clean_ld:.2f}, corrupted {corrupt_ld:.2f}) when the clean activation is patched in",
                 fontsize=10)
    fig.tight_layout()
    out.png(fig, "patching.png")
    out.json("patching", {"tokens_clean": token_labels(tokenizer, ids), "tokens_corrupt": token_labels(tokenizer, bad),
                          "target": tokenizer.decode([goal]), "foil": tokenizer.decode([other]),
                          "logit_diff_clean": clean_ld, "logit_diff_corrupt": corrupt_ld,
                          "recovered": {k: v.tolist() for k, v in results.items()}})


def view_dla(model, tokenizer, ids, out):
    plt = pyplot()
    idx = torch.tensor([ids], device=DEVICE)
    goal = one_token(tokenizer, target, "target") if target else top_token(interp.run_with_cache(model, idx)[0])
    other = one_token(tokenizer, foil, "foil") if foil else None
    dla = interp.direct_logit_attribution(model, idx, goal, other)
    what = f"logit[{tokenizer.decode([goal])!r}]" + (f" - logit[{tokenizer.decode([other])!r}]" if other else "")
    grid = torch.cat([dla["heads"], dla["mlps"][:, None]], 1).cpu()
    fig, ax = plt.subplots(figsize=(1.0 * grid.size(1) + 3, 0.45 * grid.size(0) + 2))
    heatmap(ax, grid, f"direct contribution to {what}\nembedding {dla['embed']:.2f}, sum {dla['total']:.2f}"
            f" = logit {dla['logit']:.2f} (final norm's scale frozen)",
            [f"h{h}" for h in range(model.config.n_head)] + ["MLP"],
            [layer_label(model, i) for i in range(len(model.blocks))], center=True)
    fig.tight_layout()
    out.png(fig, "dla.png")
    print(f"direct logit attribution of {what}: embedding {dla['embed']:.3f}, heads {dla['heads'].sum():.3f}, "
          f"MLPs {dla['mlps'].sum():.3f}; sum {dla['total']:.3f} = pre-softcap logit {dla['logit']:.3f}")
    out.json("dla", {"tokens": token_labels(tokenizer, ids), "target": tokenizer.decode([goal]),
                     "foil": tokenizer.decode([other]) if other is not None else None, "embed": dla["embed"],
                     "heads": dla["heads"].tolist(), "mlps": dla["mlps"].tolist(), "total": dla["total"],
                     "logit_before_softcap": dla["logit"], "final_norm_scale": dla["scale"],
                     "method": "contributions = component . (s * norm weight * unembedding direction), s the final "
                               "RMSNorm's 1/rms frozen at this run's value; they sum to the pre-softcap logit"})


def view_induction(model, tokenizer, ids, out):
    plt = pyplot()
    if 2 * n_repeat_tokens > model.config.block_size:
        fail(f"--n_repeat_tokens={n_repeat_tokens} twice is more than block_size {model.config.block_size}")
    generator = torch.Generator().manual_seed(seed)
    idx = interp.repeated_random_tokens(n_repeat_seqs, n_repeat_tokens, tokenizer.vocab_size, generator).to(DEVICE)
    induction, previous, (loss_first, loss_second) = interp.induction_scores(model, idx)
    layers = [layer_label(model, i) for i in range(len(model.blocks))]
    heads = [f"h{h}" for h in range(model.config.n_head)]
    fig, axes = plt.subplots(1, 2, figsize=(2 * (0.7 * len(heads) + 2.5), 0.45 * len(layers) + 2))
    heatmap(axes[0], induction, "induction: attention to the token after\nthe earlier copy", heads, layers,
            vmin=0, vmax=1)
    heatmap(axes[1], previous, "previous token: attention to i - 1", heads, layers, vmin=0, vmax=1)
    fig.suptitle(f"{n_repeat_seqs} random sequences of {n_repeat_tokens} tokens, repeated once; loss "
                 f"{loss_first:.2f} on the first half, {loss_second:.2f} on the second", fontsize=9)
    fig.tight_layout()
    out.png(fig, "induction.png")
    print(f"induction: loss {loss_first:.3f} on the random first half, {loss_second:.3f} on its repeat; best induction"
          f" head {divmod(int(induction.argmax()), len(heads))} ({induction.max():.2f}), best previous-token head "
          f"{divmod(int(previous.argmax()), len(heads))} ({previous.max():.2f}) as (layer, head)")
    out.json("induction", {"n_repeat_tokens": n_repeat_tokens, "n_repeat_seqs": n_repeat_seqs, "seed": seed,
                           "induction": induction.tolist(), "previous_token": previous.tolist(),
                           "loss_first_half": loss_first, "loss_second_half": loss_second})


def read_val_tokens():
    from nanogpt.shards import read_shard, shard_paths
    try:
        paths = shard_paths(os.path.join(data_root, dataset), "val")
        stream = [torch.from_numpy(read_shard(p)[:moe_tokens].astype("int64")) for p in paths[:1]]
    except (OSError, ValueError) as e:
        fail(f"moe: {e}")
    return stream[0]


def view_moe(model, tokenizer, ids, out):
    plt = pyplot()
    if not model.moe_layers():
        fail("this model has no MoE layers (n_expert = 0): the moe view needs one")
    stream = read_val_tokens()
    try:
        stats = interp.routing_stats(model, stream.to(DEVICE), model.config.block_size)
    except ValueError as e:
        fail(str(e))
    layers = sorted(stats)
    loads = torch.stack([stats[i]["load"] for i in layers]).float()
    E = model.config.n_expert
    fig, axes = plt.subplots(1, 2, figsize=(0.5 * E + 9, 0.45 * len(layers) + 2.2), width_ratios=(E, 6))
    heatmap(axes[0], loads, f"share of routed slots per expert (uniform {1 / E:.3f})", [f"e{e}" for e in range(E)],
            [f"layer {i}" for i in layers], vmin=0)
    axes[1].barh(range(len(layers)), [stats[i]["entropy"] for i in layers])
    axes[1].set_yticks(range(len(layers)))
    axes[1].set_yticklabels([f"layer {i}" for i in layers], fontsize=7)
    axes[1].invert_yaxis()
    axes[1].axvline(torch.log(torch.tensor(float(E))).item(), color="k", ls="--", lw=0.8)
    axes[1].set_title("router entropy (nats; dashed: uniform)", fontsize=9)
    fig.suptitle(f"routing of {len(stream):,} {dataset} val tokens", fontsize=10)
    fig.tight_layout()
    out.png(fig, "moe.png")
    table = {}
    for i in layers:
        counts = stats[i]["counts"].float()                     # (E, vocab): token id -> expert
        occurrences = (counts.sum(0) / model.config.n_expert_active).clamp(min=1)  # each goes to k experts
        table[i] = []
        for e in range(E):
            top = counts[e].topk(min(top_tokens, counts.size(1)))
            table[i].append([[tokenizer.decode([t]), int(c), round(c / occurrences[t].item(), 3)]
                             for c, t in zip(top.values.tolist(), top.indices.tolist()) if c > 0])
        print(f"layer {i}: load max/mean {loads[layers.index(i)].max() * E:.2f}, router entropy "
              f"{stats[i]['entropy']:.3f}; most routed tokens per expert: "
              + "; ".join(f"e{e} " + "".join(repr(t)[1:-1] for t, _, _ in rows[:4]) for e, rows in enumerate(table[i])))
    out.json("moe", {"dataset": dataset, "tokens": len(stream), "layers": [
        {"layer": i, "load": stats[i]["load"].tolist(), "router_entropy": stats[i]["entropy"],
         "top_tokens": {f"e{e}": rows for e, rows in enumerate(table[i])}} for i in layers],
        "top_tokens_columns": ["token", "times routed to the expert", "share of the token's occurrences"]})


# -------------------------------------------------------------------------------------------------------- main

def main():
    global DEVICE
    config = configure(globals())
    at_least(config, 1, "n_repeat_tokens", "n_repeat_seqs", "moe_tokens", "top_tokens")
    model, tokenizer, _, DEVICE, _, autocast = load_for_inference(out_dir, device, dtype, attn_impl)
    if view == "names":
        print("\n".join(interp.hook_names(model)))
        return
    torch.manual_seed(seed)
    if view == "all":
        views = [v for v in VIEWS if (v != "patching" or corrupt) and (v != "moe" or model.moe_layers())]
        print(f"views: {', '.join(views)} (patching needs --corrupt; moe an MoE model)")
    else:
        views = [view]
    uses_prompt = set(views) - {"induction", "moe"}
    ids = prompt_ids(tokenizer, prompt, "prompt", model.config.block_size) if uses_prompt else None
    try:
        out = Output(os.path.join(results_dir(out_dir), "interp"))
    except OSError as e:
        fail(f"cannot write the results: {e}")
    with autocast:
        for name in views:
            globals()[f"view_{name}"](model, tokenizer, ids, out)
    print("wrote " + ", ".join(os.path.relpath(p) for p in out.written))


if __name__ == "__main__":
    main()
