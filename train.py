"""Train a GPT. The defaults are the quick run: character-level tiny Shakespeare, under two minutes on a 2-core CPU.

    python train.py                                          # the quick run (prepares its data when missing)
    python train.py config/train_shakespeare_char.py --max_iters=500
    torchrun --standalone --nproc_per_node=8 train.py config/train_7b.py --batch_size=8
    python train.py config/train_7b.py --dry_run=True        # parameter count, FLOPs and KV cache, built on meta

Reads top to bottom: settings, their checks, helpers, then main(): setup, data, model, optimizer, loop. How a run
starts (scratch, resume, new phase) is nanogpt/start.py; the objective (next-token or DPO) nanogpt/objectives.py;
parallelism nanogpt/parallel.py; the optimizer and schedule nanogpt/optim.py; checkpoints nanogpt/checkpoint.py;
the dry run nanogpt/memory.py; the log lines and plot nanogpt/metrics.py; data phases nanogpt/phases.py.
"""
import math
import os
import re
import time
from contextlib import nullcontext
from dataclasses import fields
from typing import Literal

import torch

from configurator import at_least, configure, given, require
from model import GPTConfig
from nanogpt import energy, lora, metrics, parallel, rl, start
from nanogpt.checkpoint import has_checkpoint, load_sharded, read_lora_base, save_run
from nanogpt.distill import load_teacher
from nanogpt.memory import dry_run_vocab_size, plan_for, print_dry_run
from nanogpt.objectives import batch_weights, evaluate, make_objective
from nanogpt.optim import OPTIMIZERS, SCHEDULES, WSD_SHAPES, build_optimizer, scheduled_lr, scheduled_momentum
from nanogpt.optim import set_lr, state_bytes
from nanogpt.parallel import cut_xla_graph, finish, gradient_sync, mean_over_ranks, sum_over_ranks
from nanogpt.phases import PhaseError, PhasedLoader, Plan, check_phases, dataset_names
from nanogpt.phases import write_report as write_phase_report
from nanogpt.runtime import ATTN_IMPLS, DTYPE_SETTINGS, autocast_for, resolve_attn_impl, resolve_dtype
from nanogpt.runtime import device_type as device_type_of
from nanogpt.runtime import peak_flops as device_peak_flops
from nanogpt.tasks import in_training
from nanogpt.tokenizer import model_vocab_size

# ----------------------------------------------------------------------------------------------------------- config
# I/O
out_dir = "out"                # ckpt.pt (or step_N/ under FSDP), metrics.jsonl and loss.png go here
eval_interval = 140            # evaluate (and checkpoint) every this many iterations
eval_iters = 12                # batches per split in each evaluation
log_interval = 25              # a log line (loss, lr, tokens/s, MFU) every this many iterations
eval_only = False              # evaluate once and stop
eval_tasks = ""                # eval.py tasks run on the weights at every evaluation, e.g. 'hellaswag,arc_easy'
eval_task_limit = 100          # questions per task in each of those (the same ones each time; split over DDP ranks)
eval_task_data_dir = ""        # their files, as eval.py's --data_dir ('' = downloaded once into the cache)
always_save_checkpoint = True  # save at every evaluation, not only when val loss improves
init_from = "scratch"          # 'scratch', 'resume' (out_dir's run), or new-phase weights: a run, ckpt.pt or hf:FOLDER
overwrite = False              # let a scratch run replace the checkpoint already in out_dir
dry_run = False                # print parameters, FLOPs, KV cache and the memory plan for this config, then exit
kv_context = 8192              # context length of the dry run's KV-cache report
# data
data_root = "data"             # folder holding the dataset folders
dataset = "shakespeare_char"   # a folder in data_root with train_*.bin / val_*.bin shards and tokenizer.json
datasets = {}                  # {name: weight} mixes several prepared datasets; overrides `dataset` when set
phases = []                    # [{name, datasets, iters or tokens, temperature}]: mixtures in turn (nanogpt/phases.py)
curriculum = []                # datasets read in their stored order (data/text/prepare.py --order) instead of shuffled
batch_size = 32                # micro-batch per device
block_size = 128               # context length
gradient_accumulation_steps = 1  # micro-batches per optimizer step
total_batch_size = 0           # about this many tokens per optimizer step: > 0 derives gradient_accumulation_steps
# model (see GPTConfig in model.py)
n_layer = 4
n_embd = 128
n_head = 4
n_kv_head = 0                  # K/V heads: 1 = MQA, 0 = n_head (MHA), in between = GQA
kv_lora_rank = 0               # > 0: multi-head latent attention (MLA) with a K/V latent this wide (needs qk_norm=False)
q_lora_rank = 0                # MLA: queries through a latent this wide; 0 = one projection
qk_nope_head_dim = 0           # MLA: per-head query/key width without RoPE; 0 = n_embd // n_head
qk_rope_head_dim = 0           # MLA: the RoPE part's width (one rope key shared by all heads); 0 = half a head
v_head_dim = 0                 # MLA: per-head value width; 0 = n_embd // n_head
mlp = "relu2"                  # 'swiglu' or 'relu2'
mlp_hidden = 0                 # 0 = 8/3 n_embd (swiglu) or 4 n_embd (relu2), rounded up to a multiple of 64
qk_norm = True                 # RMSNorm on queries and keys
tie_embeddings = False         # the head shares the embedding's weights
dropout = 0.0                  # in [0, 1)
rope_theta = 10000.0           # RoPE base
attn_pattern = "G"             # tiled over the layers: L = sliding window, G = global, e.g. 'LLLLLG'
local_window = 1024            # a local layer's query at i sees keys in (i - local_window, i]
kv_share = 1                   # adjacent same-kind layers sharing one K/V (2 = CLA2)
share_global_kv = False        # every global layer uses the first global layer's K/V
n_expert = 0                   # routed experts; 0 = dense MLPs
n_expert_active = 2            # experts per token (top-k)
n_shared_expert = 1            # always-on experts
moe_hidden = 0                 # expert width; 0 = mlp width / n_expert_active
n_dense_layers = 1             # the first layers keep a dense MLP
moe_bias_gamma = 1e-3          # aux-loss-free balancing: bias step per optimizer step
moe_aux_alpha = 1e-4           # sequence-wise balance loss: its weight beside the per-token mean loss (0 disables)
logit_softcap = 0.0            # > 0: logits = c tanh(logits / c) (Gemma 2, modded-nanogpt); 0 = off
value_embeds = 0               # > 0: k extra token embeddings mixed into V of the first and last k layers
zero_init_proj = False         # residual-stream writers (o_proj, down_proj) start at zero (modded-nanogpt)
mtp_depth = 0                  # > 0: multi-token prediction modules (DeepSeek-V3) predicting tokens t+2 .. t+1+depth
mtp_weight = 0.3               # MTP loss weight lambda (DeepSeek-V3: 0.3 for its first 10T tokens, then 0.1) ...
mtp_weight_late = 0.1          # ... becoming this ...
mtp_weight_switch = 0          # ... from this iteration on (0 = never)
memory_layers = ()             # product-key memory in place of these layers' MLPs, e.g. (2,) or (1, 3)
memory_keys = 128              # sub-keys per half: memory_keys^2 value slots per memory layer
memory_topk = 16               # value slots read per head and token
memory_heads = 4               # memory read heads
memory_key_dim = 64            # query / key width per head
memory_gated = True            # Memory+ (Berges et al. 2024): the read gated by silu(W x), then projected
attn_impl: Literal[ATTN_IMPLS] = "auto"  # 'auto' = sdpa until the GPU check passes 'triton'; this process's, not saved
# optimizer and schedule (nanogpt/optim.py)
optimizer: Literal[OPTIMIZERS] = "muon"  # Muon for hidden matrices and experts, AdamW for the rest; or 'adamw'
learning_rate = 4e-3           # peak lr (each parameter group runs at its lr_scales multiple of it)
min_lr = 4e-4                  # the schedule ends here
max_iters = 280                # optimizer steps
lr_schedule: Literal[SCHEDULES] = "cosine"  # 'cosine', 'linear', 'constant' or 'wsd' (warmup-stable-decay)
warmup_iters = 50              # linear warmup steps
lr_decay_iters = 0             # the schedule reaches min_lr here; 0 = max_iters
wsd_decay_frac = 0.2           # wsd: the final fraction of iterations that decays to min_lr
wsd_shape: Literal[WSD_SHAPES] = "linear"  # wsd: the decay's shape, 'linear', 'cosine' or '1-sqrt'
muon_momentum = 0.95           # Muon: momentum after its warmup
muon_momentum_start = 0.85     # Muon: momentum at iteration 0 ...
muon_momentum_warmup = 0       # ... rising linearly to muon_momentum over this many iterations (0 = no warmup)
muon_nesterov = True           # Muon: Nesterov momentum
muon_ns_steps = 5              # Muon: Newton-Schulz steps
muon_coefficients: Literal["quintic", "polar_express"] = "quintic"  # Muon: the Newton-Schulz polynomials
muon_normalize = False         # Muon: NorMuon's per-row second-moment normalization of each update
weight_decay = 0.1             # on matrices, embedding and head (not on norms and other vectors)
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0                # max gradient norm; 0 = off
lr_scales = {}                 # lr multipliers per parameter group, e.g. {'embedding': 5.0}; groups in nanogpt/optim.py
# system
device = "auto"                # 'auto', 'cpu', 'cuda', 'cuda:N' or 'xla'
dtype: Literal[DTYPE_SETTINGS] = "auto"  # 'auto' (bfloat16 on CUDA and XLA, float32 elsewhere)
compile: bool | None = None    # torch.compile; None = on for CUDA, off elsewhere
seed = 1337
peak_flops = 0.0               # for MFU; 0 = look the device up
backend: Literal["auto", "nccl", "gloo"] = "auto"  # distributed backend: 'auto' (nccl on CUDA, gloo on CPU)
fp8 = False                    # attention projections, MLPs and experts in fp8 (nanokernels/fp8.py)
fp8_recipe: Literal["tensorwise", "rowwise", "blockwise"] = "tensorwise"  # blockwise: DeepSeek-V3's 1x128 / 128x128
# scale-out
fsdp = False                   # FSDP2: shard params, grads and optimizer state (checkpoints become step_N/ folders)
activation_checkpoint: Literal["none", "full", "selective"] = "none"  # selective: every ac_every-th block
ac_every = 2                   # activation_checkpoint='selective': checkpoint every this many blocks
keep_checkpoints = 2           # sharded checkpoints kept in out_dir
gpu_mem_gb = 0.0               # memory plan: GPU memory to plan for; 0 = the detected GPU
# post-training: preference pairs (data/hh_rlhf) train with DPO against the frozen starting model
dpo_beta = 0.1                 # DPO's beta: how far the policy may move from the reference
dpo_label_smoothing = 0.0      # cDPO: the probability that a preference label is wrong
dpo_ipo = False                # the IPO loss (on per-token mean log-probs) instead of DPO's
# post-training: LoRA (nanogpt/lora.py), low-rank adapters on the frozen init_from model, for any objective
train_only = ""                # regex: only parameters whose full names match it train, e.g. r'norm\.weight'; '' = all
lora_rank = 0                  # adapter rank; 0 = off (every weight trains)
lora_alpha = 16.0              # the adapters' update is scaled by lora_alpha / lora_rank
lora_dropout = 0.0             # dropout on the adapters' input (linear layers only)
lora_targets = "*_proj"        # comma-separated name patterns of the linear layers adapted, e.g. 'q_proj,v_proj'
lora_experts = False           # also adapt the routed experts (MoE), one adapter per expert and matrix
# distillation (nanogpt/distill.py): next-token data plus a frozen teacher's distribution
teacher_from = ""              # the teacher: a run folder, ckpt.pt or hf:FOLDER with the data's tokenizer; '' = off
distill_weight = 0.5           # loss = (1 - distill_weight) CE + distill_weight T^2 KL(teacher^T || student^T)
distill_temperature = 2.0      # T: both models' logits divided by T before the KL
# post-training: RL from verifiable rewards, the GRPO family (nanogpt/rl.py), from a chat (SFT) checkpoint
rl_task = ""                   # '' = off; 'arith' or 'gsm8k': problems and answers from data_root/<task>/*.jsonl
rl_reward: Literal[rl.REWARDS] = "answer"  # 1 for the right final '#### N'; 'answer_format': 0.1 if wrong but formed
rl_prompts = 8                 # prompts per rank per step
rl_group_size = 8              # completions sampled per prompt (GRPO's G; >= 2)
rl_temperature = 1.0           # sampling temperature of the rollouts and of the pass@k evaluation
rl_top_k = 0                   # sample from the top-k tokens; 0 = the whole vocabulary
rl_max_new_tokens = 32         # a completion ends at <|assistant_end|> or after this many tokens
rl_scale_rewards: Literal[rl.SCALE_REWARDS] = "group"  # advantages / std of the 'group', the 'batch', or 'none'
rl_negative_weight = 1.0       # weight of negative advantages: 1 = GRPO; < 1 leans on reinforcing successes
rl_loss_type: Literal[rl.LOSS_TYPES] = "token"  # 'token' (DAPO), 'sequence' (GRPO) or 'dr_grpo' normalisation
rl_clip_eps = 0.2              # PPO ratio clip: rho in [1 - eps, 1 + eps_high] (binds only with rl_updates > 1)
rl_clip_eps_high = 0.0         # the upper clip; 0 = rl_clip_eps (DAPO's clip-higher: 0.28)
rl_updates = 1                 # optimizer steps per sampled batch; 1 = strictly on-policy
rl_kl_beta = 0.0               # weight of the k3 KL to the frozen starting model; 0 = no reference model
rl_eval_split = "val"          # held-out problems of pass@1 / pass@k at evaluations: data_root/<task>/<split>.jsonl
rl_eval_problems = 100         # problems per evaluation; 0 = the whole split
rl_eval_samples = 8            # completions per problem: pass@1 and pass@<this>
# energy and CO2e (nanogpt/energy.py)
pue = energy.DEFAULT_PUE       # data-centre overhead (1.56: Uptime Institute Global Data Center Survey 2024)
carbon_intensity_g_per_kwh = energy.DEFAULT_G_PER_KWH  # grid (366 g CO2/kWh: US utility-scale average 2023, EIA)
power_estimate_w = 0.0         # watts per node when power cannot be measured; 0 = the GPUs' TDP, or 3.75 W per core
projection_gpu = "H100"        # dry run: the GPU of the energy projection (its FLOPs and TDP: nanogpt/energy.py)
projection_mfu = 0.4           # dry run: the MFU of the energy projection
# speedrun
target_val_loss = 0.0          # > 0: stop at the first evaluation whose val loss is at or below this
val_tokens = 0                 # > 0: val loss over exactly the first val_tokens tokens of the val split, in order

# ------------------------------------------------------------------------------------------------------------ checks


def check_settings(config):
    """Stop with one line (config error: ...) at the first bad setting, before anything runs."""
    at_least(config, 1, "batch_size", "block_size", "eval_interval", "log_interval", "eval_iters",
             "gradient_accumulation_steps", "n_layer", "n_embd", "n_head", "ac_every", "keep_checkpoints",
             "muon_ns_steps")
    at_least(config, 0, "max_iters", "warmup_iters", "lr_decay_iters", "total_batch_size", "grad_clip", "weight_decay",
             "muon_momentum_warmup", "target_val_loss", "logit_softcap", "val_tokens", "carbon_intensity_g_per_kwh",
             "power_estimate_w", "mtp_weight", "mtp_weight_late", "mtp_weight_switch")
    at_least(config, 1, "pue")
    require(0 < projection_mfu <= 1, f"projection_mfu must be in (0, 1], got {projection_mfu}")
    require(0 <= muon_momentum_start < 1 and 0 <= muon_momentum < 1, "Muon momenta must be in [0, 1)")
    require(0 <= dropout < 1, f"dropout must be in [0, 1), got {dropout}")
    require(dpo_beta > 0 and 0 <= dpo_label_smoothing < 0.5 and not (dpo_ipo and dpo_label_smoothing),
            "need dpo_beta > 0, 0 <= dpo_label_smoothing < 0.5, and no label smoothing with dpo_ipo")
    require(lora_rank >= 0 and lora_alpha > 0 and 0 <= lora_dropout < 1,
            "need lora_rank >= 0 (0 = off), lora_alpha > 0 and 0 <= lora_dropout < 1")
    require(not lora_rank or init_from != "scratch", "lora_rank > 0 adapts a trained model: name it with --init_from "
            "(a run folder, ckpt.pt or hf:FOLDER)")
    require(not (train_only and lora_rank), "train_only and lora_rank both choose what trains: set one of them")
    require(not (lora_rank and fsdp), "LoRA does not run under FSDP: train the adapters on one process or with DDP "
            "(fsdp=False)")
    require(0 <= distill_weight <= 1 and distill_temperature > 0,
            "need 0 <= distill_weight <= 1 and distill_temperature > 0")
    require(not teacher_from or os.path.exists(teacher_from.removeprefix("hf:")),
            f"teacher_from must be a run folder, ckpt.pt or hf:FOLDER; {teacher_from!r} does not exist")
    if rl_task or explicit_rl_settings():
        check_rl_settings(config)
    require(0 <= wsd_decay_frac <= 1, f"wsd_decay_frac must be in [0, 1], got {wsd_decay_frac}")
    require(learning_rate > 0 and 0 <= min_lr <= learning_rate,
            "need 0 < learning_rate and 0 <= min_lr <= learning_rate")
    require(init_from in ("scratch", "resume") or os.path.exists(init_from.removeprefix("hf:")),
            f"init_from must be 'scratch', 'resume', a run folder or ckpt.pt, or hf:FOLDER (a Hugging Face model); "
            f"{init_from!r} is none of them")
    require(out_dir.strip(), "out_dir must name a folder, got ''")
    at_least(config, 1, "eval_task_limit")
    try:
        in_training.check_names(eval_tasks)
    except ValueError as e:
        require(False, str(e))
    require(not os.path.exists(out_dir) or os.path.isdir(out_dir), f"out_dir {out_dir!r} is a file: name a folder")
    try:
        check_phases(phases)
    except PhaseError as e:
        require(False, str(e))
    require(not (phases and datasets), "set phases or datasets, not both: each phase has its own datasets")
    unknown = sorted(set(curriculum) - set(datasets or dataset_names(phases) or [dataset]))
    require(not unknown, f"curriculum names {unknown}, which this run does not train on")
    for name in datasets or dataset_names(phases) or [dataset]:  # a name, not a path: nothing outside data_root
        require(re.fullmatch(r"[\w.-]+", name) and name.strip(".") != "", f"dataset names are folder names in "
                f"data_root (letters, digits, '_', '-', '.'), got {name!r}")
    try:  # the architecture's own checks, before anything runs (the vocabulary comes with the data)
        GPTConfig(**{f.name: config[f.name] for f in fields(GPTConfig) if f.name in config})
    except ValueError as e:
        require(False, str(e))


def explicit_rl_settings():
    return sorted(k for k in given() if k.startswith("rl_") and k != "rl_task")


def check_rl_settings(config):
    """RL's own checks: a task, a group to compare, a start with chat tokens (read_start checks the checkpoint)."""
    require(rl_task, f"{', '.join(explicit_rl_settings())} only apply to RL: set rl_task ({', '.join(rl.TASKS)}) "
            "or drop them")
    require(rl_task in rl.TASKS, f"rl_task must be one of {', '.join(rl.TASKS)} (or '' for no RL), got {rl_task!r}")
    require(rl_group_size >= 2, f"rl_group_size must be >= 2 (advantages compare the completions of one prompt), "
            f"got {rl_group_size}")
    at_least(config, 1, "rl_prompts", "rl_max_new_tokens", "rl_updates", "rl_eval_samples")
    at_least(config, 0, "rl_top_k", "rl_kl_beta", "rl_eval_problems", "rl_clip_eps", "rl_clip_eps_high",
             "rl_negative_weight")
    require(rl_temperature > 0, f"rl_temperature must be > 0 (sampling), got {rl_temperature}")
    require(init_from != "scratch" or dry_run, "RL starts from a chat model: set --init_from to an SFT run (or its "
            "ckpt.pt)")


def rl_settings(place):
    """What nanogpt/rl.py reads: the rl_* settings, the micro-batch (sequences per forward) and the world size."""
    return {**{k: v for k, v in globals().items() if k.startswith("rl_")}, "micro_batch": batch_size,
            "world_size": place.world_size, "seed": seed}


def place_process():
    """This process's Placement: torchrun's rank and device, the dtype, compile and attention kernel resolved."""
    try:
        rank, local_rank, world_size, dev, mode = parallel.init_distributed(device, backend, fsdp)
    except ValueError as e:  # a device that is not there or not a device
        require(False, str(e))
    kind = device_type_of(dev)
    if mode == "fsdp" and dtype == "float16":
        finish("fsdp=True with dtype='float16' would train without loss scaling: use bfloat16 (or float32)")
    dtype_name, ptdtype = resolve_dtype(dtype, kind)
    compiled = kind == "cuda" if compile is None else compile and kind != "xla"
    return start.Placement(rank, local_rank, world_size, dev, mode, kind, dtype_name, ptdtype, compiled,
                           resolve_attn_impl(attn_impl))


def report_dry_run(config, explicit, place, tokens_per_iter):
    """Parameters, FLOPs, KV cache, the memory plan and the energy projection of this config (built on meta)."""
    try:
        model = start.build_meta_model(config, explicit, dry_run_vocab_size(config), place)
        if place.master:
            plan, gpu = plan_for(model, config, place.world_size, place.device, place.device_type, place.dtype)
            print_dry_run(model, config, place.world_size, tokens_per_iter, plan, gpu)
    except ValueError as e:  # an unknown projection_gpu, fp8 on XLA
        finish(str(e))
    finish()

# ----------------------------------------------------------------------------------------- evaluation, checkpoints


def next_batch(loader, place):
    return parallel.shard_batch(place.mode, *loader.next_batch(place.device))


def estimate_loss(model, objective, kind, eval_loaders, eval_starts, place, autocast):
    """{split: metrics} over eval_iters fixed batches of each split (loaders rewound: the same batches every eval)."""
    model.eval()
    out = {}
    for split, loader in eval_loaders.items():
        loader.load_state_dict(eval_starts[split])
        batches = [next_batch(loader, place) for _ in range(getattr(loader, "batches", eval_iters))]
        with autocast:
            out[split] = evaluate(objective, kind, batches, place.world_size, place.device)
    model.train()
    return out


def run_joules(meter, place, joules_before):
    """Energy of the whole run so far: every node, earlier phases of a resumed run included (a collective)."""
    joules = torch.tensor(meter.joules(), dtype=torch.float64, device="cuda" if place.device_type == "cuda" else "cpu")
    return joules_before + sum_over_ranks(joules).item()


def save(config, model, raw_model, opt, progress, val_loss, joules, train_loader, tokenizer, records, place, kind):
    """This run's checkpoint: its weights and optimizer, and what resuming it needs (nanogpt/checkpoint.py)."""
    rng = {"torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if place.device_type == "cuda" else None}
    meta = {"model_args": {f.name: getattr(raw_model.config, f.name) for f in fields(GPTConfig)}, "config": config,
            "iter_num": progress.iter_num, "best_val_loss": progress.best_val_loss, "val_loss": val_loss,
            "train_seconds": progress.train_seconds, **records, "energy_joules": joules,
            "loader": train_loader.state_dict(), "tokenizer": tokenizer.spec, "rng": rng,
            "objective": kind}
    save_run(out_dir, meta, model, raw_model, opt, place.mode, place.master, keep_checkpoints)  # LoRA: adapters only


def kept_note():
    return "the last good checkpoint is kept" if has_checkpoint(out_dir) else "no checkpoint was written yet"

# -------------------------------------------------------------------------------------------------------------- main


def main():
    global max_iters  # phases set it: the sum of their lengths
    config = configure(globals())
    check_settings(config)
    explicit = given()
    place = place_process()
    master = place.master
    autocast = nullcontext() if place.mode == "fsdp" else autocast_for(place.device_type, place.ptdtype)  # FSDP2 casts
    torch.manual_seed(seed + place.rank)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    accumulation = gradient_accumulation_steps  # or the count closest to total_batch_size tokens per step
    if total_batch_size:
        accumulation = max(1, round(total_batch_size / (batch_size * block_size * place.world_size)))
    tokens_per_iter = accumulation * place.world_size * batch_size * block_size
    if dry_run:
        report_dry_run(config, explicit, place, tokens_per_iter)
    meter = energy.Meter(energy.power_source(place.device_type, place.local_rank, power_estimate_w))  # this node

    # data
    created = not os.path.exists(out_dir)

    def refuse(message):  # a run refused before it wrote anything leaves no folder behind
        if created and master:
            start.remove_if_unused(out_dir)
        finish(message)
    try:
        _lock = start.prepare_out_dir(out_dir, init_from, overwrite, master)  # held until the process exits
        data_dirs, mix_weights = start.dataset_dirs(data_root, datasets or dict.fromkeys(dataset_names(phases), 1.0)
                                                    or {dataset: 1.0}, master)
        plan = Plan(phases, data_dirs, tokens_per_iter) if phases else None
        if plan and "max_iters" in explicit and max_iters > plan.total_iters:
            raise ValueError(f"config error: max_iters={max_iters} but the phases add up to {plan.total_iters} "
                             "iterations: drop max_iters (the phases set it) or lengthen the phases")
        if plan:  # the run is the plan (an explicit smaller max_iters stops it early); the lr schedule spans it
            max_iters = config["max_iters"] = max_iters if "max_iters" in explicit else plan.total_iters
            mix_weights = plan.overall_weights().tolist()  # the evaluation loaders mix the whole run's data
        train_loader, eval_loaders, tokenizer = start.make_loaders(config, data_dirs, mix_weights, place)
        train_loader.read_in_order([i for i, d in enumerate(data_dirs) if os.path.basename(d) in curriculum])
        if plan:
            train_loader = PhasedLoader(train_loader, plan, accumulation, block_size, master)
    except (OSError, ValueError) as e:  # missing or corrupt shards, no tokenizer record: the message says what to do
        refuse(str(e))
    kind = "rl" if rl_task else "dpo" if train_loader.pairs else "next_token"  # pretraining and SFT: next_token
    if kind != "dpo" and explicit & set(start.DPO_SETTINGS):
        refuse(f"config error: {', '.join(sorted(explicit & set(start.DPO_SETTINGS)))} only apply to preference "
               f"pairs (DPO), and {datasets or dataset} holds none: drop them")
    if teacher_from and kind == "dpo":
        refuse("config error: teacher_from distils next-token data, and this dataset holds preference pairs: drop it")
    if not teacher_from and explicit & {"distill_weight", "distill_temperature"}:
        refuse("config error: distill_weight and distill_temperature only apply with a teacher: set --teacher_from")
    eval_starts = {split: loader.state_dict() for split, loader in eval_loaders.items()}  # rewound to at every eval
    if kind == "rl":  # the task's problems as prompts replace the training rows (the shards' losses are evaluated)
        try:
            rl_eval_set = rl.task_problems(data_root, rl_task, rl_eval_split)[:rl_eval_problems or None]
            train_loader = rl.PromptStream(rl.task_problems(data_root, rl_task, "train"), rl_prompts, place.rank,
                                           place.world_size, seed, place.device)
        except (OSError, ValueError) as e:
            refuse(str(e))

    # model: from scratch, resumed, or a new phase's weights (nanogpt/start.py); DPO's frozen reference beside it
    try:
        resume_from = start.resume_path(out_dir, place.mode) if init_from == "resume" else None
        checkpoint = start.read_start(init_from, resume_from, place.mode, tokenizer, master, kind)
        vocab_size = checkpoint["model_args"]["vocab_size"] if checkpoint else model_vocab_size(tokenizer)
        adapters = checkpoint if init_from == "resume" and checkpoint and "lora" in checkpoint else None
        base = read_lora_base(adapters, resume_from) if adapters else checkpoint  # a LoRA run resumes on its base
        model = start.build_model(config, explicit, vocab_size, place, base)
        full_state = state_bytes(optimizer, model, muon_normalize)  # what full fine-tuning's optimizer would keep
        adapted, lora_id = start.start_adapters(model, config, init_from, base, adapters) if lora_rank or adapters \
            else ([], {})
        trained = start.freeze_all_but(model, train_only) if train_only else []
        recorded = checkpoint.get("teacher_fingerprint") if init_from == "resume" else None
        teacher, teacher_id = (load_teacher(teacher_from, tokenizer, block_size, place.device, recorded)
                               if teacher_from else (None, {}))
        reference_from = checkpoint.get("reference_from", "scratch") if init_from == "resume" else init_from
        resumed = checkpoint if init_from == "resume" else None  # its reference must be the one it started from
        reference = (start.reference_model(config, explicit, vocab_size, place, tokenizer, reference_from, resumed)
                     if train_loader.pairs or (kind == "rl" and rl_kl_beta > 0) else None)
        reference_id = getattr(reference, "identity", {"reference_from": reference_from})
    except (OSError, RuntimeError, ValueError) as e:  # the message says which file and what to do
        refuse(str(e))
    if master:
        print(f"{model.num_params():,} parameters ({model.num_params(active=True):,} active), "
              f"{tokens_per_iter:,} tokens/iter, device {place.device} {place.dtype}, {place.mode} over "
              f"{place.world_size} process(es), attention {place.attn_kernel}, "
              f"activation_checkpoint={activation_checkpoint!r}")
        if adapted:
            print(lora.describe(model, adapted))
        if trained:
            n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"training only {', '.join(trained)} ({n_trained:,} parameters, train_only={train_only!r}); "
                  "the rest is frozen")
        if teacher is not None:
            print(f"distilling from {teacher_from} ({teacher.num_params():,} parameters): loss = "
                  f"{1 - distill_weight:g} CE + {distill_weight:g} x {distill_temperature:g}^2 KL at T = "
                  f"{distill_temperature:g}")

    # optimizer, and a resumed run's state
    opt = build_optimizer(optimizer, model, learning_rate, weight_decay, (beta1, beta2), lr_scales, place.device_type,
                          muon=dict(momentum=muon_momentum, nesterov=muon_nesterov, ns_steps=muon_ns_steps,
                                    coefficients=muon_coefficients, normalize=muon_normalize, normalize_beta2=beta2))
    if adapted and master:
        print(f"optimizer state planned: {state_bytes(optimizer, model, muon_normalize):,} bytes for the adapters "
              f"({full_state:,} for full fine-tuning with {optimizer})")
    scaler = torch.amp.GradScaler(place.device_type, enabled=place.dtype == "float16" and place.device_type == "cuda"
                                  and place.mode != "fsdp")
    progress = start.Progress()
    if init_from == "resume":
        state = dict(checkpoint, **load_sharded(resume_from, model, opt)) if place.mode == "fsdp" else checkpoint
        try:
            progress = start.resume(state, resume_from, opt, train_loader, place, out_dir)
        except ValueError as e:
            finish(str(e))
    elif master and os.path.exists(os.path.join(out_dir, metrics.FILE)):
        os.remove(os.path.join(out_dir, metrics.FILE))  # a fresh run starts a fresh log
    checkpoint = state = None

    raw_model = model
    model = parallel.wrap_for_training(model, place.mode, place.compile, place.device)
    if place.mode == "xla_spmd" and master:
        print(parallel.describe_xla_sharding(model))
    def mtp_lambda():  # read at each micro-batch: the schedule follows progress.iter_num
        if not mtp_depth:
            return 0.0
        return mtp_weight_late if 0 < mtp_weight_switch <= progress.iter_num else mtp_weight
    distill = dict(teacher=teacher, head=raw_model.lm_head, softcap=raw_model.config.logit_softcap,
                   weight=distill_weight, temperature=distill_temperature, vocab=tokenizer.vocab_size)
    saved_kind = kind  # the checkpoint records the data's objective (distillation trains on next-token data)
    kind = "distill" if teacher is not None else kind
    objective = make_objective("next_token" if kind == "rl" else kind, model, accumulation, reference, dpo_beta,
                               dpo_label_smoothing, dpo_ipo, distill, mtp_lambda)
    rl_run = rl.RLRun(rl_settings(place), tokenizer, raw_model, reference) if kind == "rl" else None
    flops_per_iter = raw_model.flops_per_token(block_size) * tokens_per_iter
    peak = (peak_flops or device_peak_flops(place.device)) * place.world_size

    def optimizer_step():  # one update from the accumulated gradients (RL calls it rl_updates times a batch)
        if grad_clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    # loop
    t_start = t_log = t_train = time.time()  # t_train: when training (not evaluating) last resumed
    losses = {}
    while True:
        lr = scheduled_lr(progress.iter_num, lr_schedule, learning_rate, min_lr, warmup_iters,
                          lr_decay_iters or (plan.total_iters if plan else max_iters), wsd_decay_frac, wsd_shape)
        set_lr(opt, lr, scheduled_momentum(progress.iter_num, muon_momentum_start, muon_momentum,
                                           muon_momentum_warmup))

        if progress.iter_num % eval_interval == 0 or progress.iter_num == max_iters:
            t_eval = time.time()
            progress.train_seconds += t_eval - t_train
            evaluated = estimate_loss(model, objective, kind, eval_loaders, eval_starts, place, autocast)
            if eval_tasks:  # logged beside the val loss as val_<task>/<metric>, and val_tasks_seconds
                evaluated["val"].update(in_training.metrics_or_stop(raw_model, tokenizer, in_training.check_names(
                    eval_tasks), eval_task_limit, eval_task_data_dir, place, autocast))
            if kind == "rl":  # pass@1 and pass@k of the policy on held-out problems
                with autocast:
                    evaluated["val"].update(rl.evaluate_pass(raw_model, tokenizer, rl_eval_set, rl_run.s,
                                                             place.rank, place.world_size))
            joules = run_joules(meter, place, progress.joules_before)
            losses = {split: m["loss"] for split, m in evaluated.items()}
            if master:
                metrics.log_eval(out_dir, progress.iter_num, evaluated, lr, time.time() - t_start, joules,
                                 meter.source.label, pue, carbon_intensity_g_per_kwh)
            if not math.isfinite(losses["val"]):  # the same on every rank: losses are all-reduced
                finish(f"val loss is not finite at iter {progress.iter_num}: stopping, {kept_note()}")
            reached = target_val_loss and losses["val"] <= target_val_loss
            if reached and master:
                print(f"reached val loss {losses['val']:.4f} <= {target_val_loss} at step {progress.iter_num} after "
                      f"{progress.train_seconds:.1f} s of training (eval excluded), "
                      f"{progress.iter_num * tokens_per_iter:,} tokens, world {place.world_size}")
            if progress.iter_num > 0 and (losses["val"] < progress.best_val_loss or always_save_checkpoint):
                progress.best_val_loss = min(progress.best_val_loss, losses["val"])
                save(config, model, raw_model, opt, progress, losses["val"], joules, train_loader, tokenizer,
                     dict(reference_id, **lora_id, **teacher_id), place, saved_kind)
            if eval_only or reached:
                break
            t_train = time.time()
            t_log += t_train - t_eval  # ms/iter and tokens/s count training steps only
        if progress.iter_num >= max_iters:
            break

        if kind == "rl":  # rollouts, rewards, advantages and rl_updates optimizer steps (nanogpt/rl.py)
            step_metrics = rl_run.step(model, train_loader.next_problems(), train_loader.generator, optimizer_step,
                                       autocast)
            trained_tokens = None
        else:
            batches = [next_batch(train_loader, place) for _ in range(accumulation)]
            weight, trained_tokens = batch_weights(kind, batches, place.world_size)
            step_metrics = {}
            for micro_step, batch in enumerate(batches):
                with gradient_sync(model, micro_step == accumulation - 1), autocast:
                    loss, batch_metrics = objective(batch, weight)
                scaler.scale(loss).backward()
                for k, v in batch_metrics.items():
                    step_metrics[k] = step_metrics.get(k, 0.0) + v * weight
            optimizer_step()
        loads = raw_model.expert_loads()  # MoE only: expert biases follow the step's loads over every rank
        imbalance = raw_model.update_expert_biases(sum_over_ranks(loads)) if loads is not None else None
        cut_xla_graph(place.device)
        progress.iter_num += 1

        if progress.iter_num % log_interval == 0:
            # means over ranks: the metrics of the whole global batch; .item() is the step's only host sync
            logged = {k: mean_over_ranks(v).item() for k, v in step_metrics.items()}
            loss_value, joules = logged.pop("loss"), run_joules(meter, place, progress.joules_before)
            if not math.isfinite(loss_value):  # the same on every rank (all-reduced), so every rank stops here
                finish(f"loss is not finite ({loss_value}) at iter {progress.iter_num}: stopping, {kept_note()}; "
                       "try a lower learning_rate or grad_clip")
            if master:
                dt = (time.time() - t_log) / log_interval
                t_log = time.time()
                if trained_tokens is not None and trained_tokens.item() < tokens_per_iter:  # masked (SFT) data
                    logged["trained_tokens"] = int(trained_tokens.item())
                compilations = parallel.xla_compilations() if place.device_type == "xla" else None
                metrics.log_train(out_dir, progress.iter_num, loss_value, logged, lr, dt, tokens_per_iter,
                                  flops_per_iter / dt / peak if peak and kind != "rl" else None, joules, pue,
                                  carbon_intensity_g_per_kwh, imbalance.item() if imbalance is not None else None,
                                  train_loader.mixture(), compilations)

    joules = run_joules(meter, place, progress.joules_before)
    meter.stop()
    if master and phases:
        write_phase_report(out_dir, train_loader)
    if master and adapted:
        print(f"LoRA: {sum(p.numel() for p in raw_model.parameters() if p.requires_grad):,} trainable parameters, "
              f"optimizer state {lora.optimizer_state_bytes(opt):,} bytes measured")
    if master and losses:
        print(f"final val loss {losses['val']:.4f} at iter {progress.iter_num} ({time.time() - t_start:.1f} s, "
              f"{energy.describe(joules, meter.source.label, pue, carbon_intensity_g_per_kwh)})")
    finish()


if __name__ == "__main__":
    main()
