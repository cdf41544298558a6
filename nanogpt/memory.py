"""A per-GPU memory plan, computed from the config alone (the model is built on the meta device), so that a launch
that cannot fit is stopped before it allocates anything.

What is counted, per GPU:
- params, grads: fp32 masters and fp32 gradients (sharded by world size under FSDP, whole under DDP);
- optimizer: the chosen optimizer's state, as optim.state_bytes reports it (sharded under FSDP);
- gathered: FSDP's unsharded bf16 copies of the block being computed and the one being prefetched;
- activations: the tensors autograd keeps per token per layer (listed in `saved_per_token`), times batch·block_size;
  with checkpointing only each checkpointed block's input is kept, plus one block's activations while it is recomputed;
- loss: the loss never holds all logits (model.ChunkedCrossEntropy): one chunk's fp32 logits and gradient plus
  their compute-dtype copy, the head's fp32 weight gradient, and the hidden states' gradient it keeps;
- overhead: CUDA context, workspaces and allocator slack (a flat 2 GiB).
"""
import math
import os
from dataclasses import asdict

import torch

from model import LOSS_CHUNK_ELEMENTS, GPTConfig, KVCache, MoE, ProductKeyMemory
from nanogpt import energy
from nanogpt.optim import state_bytes
from nanogpt.tokenizer import GPT2_VOCAB_SIZE, VOCAB_MULTIPLE, Tokenizer, model_vocab_size

GIB = 2**30


def saved_per_token(cfg, block):
    """Elements autograd saves per token in one block (flash attention: no T×T scores)."""
    d, q, kv = cfg.n_embd, cfg.n_head * cfg.head_dim, 2 * cfg.n_kv_head * cfg.head_dim
    produces = hasattr(block.attn, "k_proj")
    attn = 3 * d + 4 * q + (3 * kv if produces else 0)  # x, norm(x), out; q raw/normed/rotated, attention; k, v
    if cfg.mla:  # x, norm(x), out; q latent raw/normed; q raw/rotated/assembled; the compressed K/V and normed
        # latent; rotated rope key; expanded k_nope + v and assembled k; attention output (v wide)
        qk, v = cfg.n_head * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim), cfg.n_head * cfg.v_head_dim
        r, rope = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        attn = (3 * d + 2 * cfg.q_lora_rank + 3 * qk + (r + rope) + r + rope
                + (cfg.n_head * cfg.qk_nope_head_dim + v) + qk + v)
    if isinstance(block.mlp, MoE):
        k, h, shared = cfg.n_expert_active, cfg.expert_hidden, cfg.n_shared_expert * cfg.expert_hidden
        per_hidden = 4 if cfg.mlp == "swiglu" else 3
        mlp = 2 * d + cfg.n_expert + 2 * k * d + k * per_hidden * h + per_hidden * shared
    elif isinstance(block.mlp, ProductKeyMemory):  # query raw/normed, sub-key scores, k x k pairs, the read, gate
        H, n, k = cfg.memory_heads, cfg.memory_keys, cfg.memory_topk
        mlp = 2 * d + 2 * H * cfg.memory_key_dim + 2 * H * n + H * k * k + 3 * H * k + 4 * d
    else:
        mlp = 2 * d + (4 if cfg.mlp == "swiglu" else 3) * cfg.hidden
    return attn + mlp


def memory_plan(model, batch_size, block_size, world_size, fsdp, activation_checkpoint="none", ac_every=1,
                act_bytes=2, optimizer_bytes=None):
    """Bytes per GPU by category (a dict), for the given model (on any device, meta included). optimizer_bytes:
    the optimizer's state for the whole model (default AdamW's two fp32 moments)."""
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    optimizer_bytes = 8 * n_params if optimizer_bytes is None else optimizer_bytes
    shard = world_size if fsdp else 1
    tokens = batch_size * block_size
    blocks = [*model.blocks, *(m.block for m in model.mtp)]  # MTP: one more block per depth
    per_block = [saved_per_token(cfg, b) * tokens * act_bytes for b in blocks]
    if activation_checkpoint == "none":
        checkpointed = [False] * len(per_block)
    elif activation_checkpoint == "full":
        checkpointed = [True] * len(per_block)
    else:  # 'selective': every ac_every-th block
        checkpointed = [i % ac_every == 0 for i in range(len(per_block))]
    activations = sum(tokens * cfg.n_embd * act_bytes if c else a for a, c in zip(per_block, checkpointed))
    activations += max((a for a, c in zip(per_block, checkpointed) if c), default=0)  # one block being recomputed
    block_params = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    unit = max(block_params, model.lm_head.weight.numel())
    return {
        "params (fp32)": 4 * n_params / shard,
        "grads (fp32)": 4 * n_params / shard,
        "optimizer state (fp32)": optimizer_bytes / shard,
        "gathered bf16 units (FSDP)": 2 * 2 * unit if fsdp else 0,
        "activations": activations,
        "loss (logit chunk, head grad)": min(tokens, LOSS_CHUNK_ELEMENTS // cfg.vocab_size) * cfg.vocab_size * 10
        + 4 * cfg.vocab_size * cfg.n_embd + tokens * cfg.n_embd * act_bytes,
        "overhead": 2 * GIB,
    }


def format_plan(plan, gpu_mem_gb=None):
    lines = [f"  {name:30s} {value / GIB:9.2f} GiB" for name, value in plan.items()]
    total = sum(plan.values())
    lines.append(f"  {'total per GPU':30s} {total / GIB:9.2f} GiB")
    if gpu_mem_gb:
        verdict = "fits" if fits(plan, gpu_mem_gb) else "DOES NOT FIT"
        lines.append(f"  {'GPU memory':30s} {gpu_mem_gb:9.2f} GiB  -> {verdict}")
    return "\n".join(lines)


def fits(plan, gpu_mem_gb):
    return sum(plan.values()) <= 0.95 * gpu_mem_gb * GIB


def advice(plan, gpu_mem_gb, fsdp, world_size, activation_checkpoint):
    """What to change when the plan does not fit."""
    tips = []
    states = plan["params (fp32)"] + plan["grads (fp32)"] + plan["optimizer state (fp32)"]
    if states > 0.6 * gpu_mem_gb * GIB:
        per_gpu = states * (world_size if fsdp else 1)
        needed = int(per_gpu // (0.6 * gpu_mem_gb * GIB)) + 1
        tips.append(f"shard the model: fsdp=True on at least {needed} GPUs (torchrun --nproc_per_node=...)")
    if activation_checkpoint != "full":
        tips.append("activation_checkpoint='full' (keeps one tensor per block, recomputes the rest)")
    tips.append("a smaller batch_size (gradient accumulation keeps the global batch when total_batch_size is set)")
    return tips


def print_model_report(model, seq_len, kv_context):
    """The dry run's report: parameters, FLOPs per token, and the KV cache next to equal-width GQA-8 and MHA."""
    cfg = model.config
    total, active = model.num_params(), model.num_params(active=True)
    embedding = model.wte.weight.numel()
    print(f"parameters: {total + embedding:,} total ({total:,} without the input embedding), {active:,} active")
    print(f"training FLOPs per token at {seq_len} context: {model.flops_per_token(seq_len) / 1e9:.2f} GFLOP")
    ours = KVCache.bytes_at(cfg, kv_context)
    print(f"KV cache at {kv_context:,} tokens of context (bf16, one sequence; the others global-only at this width):")
    rows = [("this model", ours)] + [(name, KVCache.bytes_at(c, kv_context)) for name, c in kv_layouts(cfg).items()]
    for name, b in rows:
        print(f"  {name:26s} {b / kv_context:>10,.0f} bytes/token {b / 2**20:>10,.1f} MiB")
    gqa8, mha = dict(rows)["GQA-8"], dict(rows)["MHA"]
    print(f"  this model needs {gqa8 / ours:.1f}x less than GQA-8 and {mha / ours:.1f}x less than MHA")


def kv_layouts(cfg):
    """The attention layouts the dry run compares at cfg's width, every layer global: {name: GPTConfig}. MLA takes
    cfg's latent widths when it has them, else DeepSeek-V3's proportions (latent 4 heads wide, rope key half a head)."""
    mha = dict(asdict(cfg), attn_pattern="G", kv_share=1, share_global_kv=False, n_kv_head=cfg.n_head,
               kv_lora_rank=0, q_lora_rank=0, qk_nope_head_dim=0, qk_rope_head_dim=0, v_head_dim=0)
    head_dim = cfg.v_head_dim if cfg.mla else cfg.head_dim
    rank, rope = cfg.kv_lora_rank or 4 * head_dim, cfg.qk_rope_head_dim or head_dim // 2
    return {"MHA": GPTConfig(**mha),
            "GQA-8": GPTConfig(**dict(mha, n_kv_head=math.gcd(8, cfg.n_head))),
            "MQA": GPTConfig(**dict(mha, n_kv_head=1)),
            "MQA + CLA2": GPTConfig(**dict(mha, n_kv_head=1, kv_share=2)),
            f"MLA (latent {rank} + rope {rope})": GPTConfig(**dict(mha, qk_norm=False, value_embeds=0,
                                                                   kv_lora_rank=rank, qk_rope_head_dim=rope))}


def plan_for(model, config, world_size, device, device_type, dtype):
    """(per-GPU memory plan, GPU memory in GiB or None) of a run's settings: planned for a bf16 GPU run, whatever
    runs it now; the GPU memory is gpu_mem_gb, else the detected GPU's."""
    plan = memory_plan(model, config["batch_size"], config["block_size"], world_size, config["fsdp"],
                       config["activation_checkpoint"], config["ac_every"],
                       act_bytes=4 if dtype == "float32" and device_type == "cuda" else 2,
                       optimizer_bytes=state_bytes(config["optimizer"], model, config["muon_normalize"]))
    detected = torch.cuda.get_device_properties(device).total_memory / GIB if device_type == "cuda" else None
    return plan, config["gpu_mem_gb"] or detected


def dry_run_vocab_size(config):
    """The model vocabulary of the configured dataset when it is prepared, else GPT-2's (a plan needs no data)."""
    name = next(iter(config["datasets"] or {config["dataset"]: 1}))
    try:
        return model_vocab_size(Tokenizer.for_dataset(os.path.join(config["data_root"], name)))
    except (OSError, ValueError):
        return -(-GPT2_VOCAB_SIZE // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def print_dry_run(model, config, world_size, tokens_per_iter, plan, gpu):
    """The dry run: parameters, FLOPs and KV cache, the memory plan, and the energy projection of the whole run.
    A ValueError for an unknown projection_gpu."""
    print_model_report(model, config["block_size"], config["kv_context"])
    print(f"memory per GPU, world size {world_size}, batch_size {config['batch_size']}, fsdp={config['fsdp']}, "
          f"activation_checkpoint={config['activation_checkpoint']!r}:")
    print(format_plan(plan, gpu))
    run_flops = model.flops_per_token(config["block_size"]) * tokens_per_iter * config["max_iters"]
    print(energy.describe_projection(run_flops, world_size, config["projection_gpu"], config["projection_mfu"],
                                     config["pue"], config["carbon_intensity_g_per_kwh"]))
