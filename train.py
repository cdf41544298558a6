"""Train a GPT. The defaults are the quick run: character-level tiny Shakespeare, under two minutes on a 2-core CPU.

    python train.py                                          # the quick run (prepares its data when missing)
    python train.py config/train_shakespeare_char.py --max_iters=500
    torchrun --standalone --nproc_per_node=8 train.py config/train_7b.py --batch_size=8
    python train.py config/train_7b.py --dry_run=True        # parameter count, FLOPs and KV cache, built on meta

Reads top to bottom: settings, setup, data, model, optimizer, loop. Parallelism lives in nanogpt/parallel.py, the
optimizer and schedule in nanogpt/optim.py, checkpoints in nanogpt/checkpoint.py, the metrics log and plot in nanogpt/metrics.py.
"""
import math
import os
import re
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import fields
from typing import Literal

import torch

from nanogpt import energy
from nanogpt import metrics
from nanogpt.checkpoint import (architecture_for, check_compatible, clean_state_dict, has_checkpoint, load_checkpoint,
                        load_sharded, read_checkpoint, read_state, remove_stale_writes, save_checkpoint, save_sharded,
                        step_dirs, to_cpu)
from configurator import at_least, configure, given, require
from nanogpt.loader import BatchLoader, PrefixLoader
from nanogpt.memory import advice, fits, format_plan, memory_plan, print_model_report
from model import GPT, GPTConfig
from nanogpt.optim import (OPTIMIZERS, SCHEDULES, WSD_SHAPES, build_optimizer, load_optimizer_state, scheduled_lr,
                   scheduled_momentum, set_lr, state_bytes)
from nanogpt.parallel import (barrier, cut_xla_graph, describe_xla_sharding, finish, gradient_sync, init_distributed,
                      mean_over_ranks, shard_batch, shard_fsdp2, sum_over_ranks, wrap_for_training, xla_compilations)
from nanogpt.runtime import ATTN_IMPLS, DTYPE_SETTINGS, autocast_for, device_type as device_type_of
from nanogpt.runtime import peak_flops as device_peak_flops, resolve_attn_impl, resolve_dtype
from nanogpt.objectives import batch_weights, make_objective
from nanogpt.posttrain import adapt_checkpoint
from nanogpt.tokenizer import GPT2_VOCAB_SIZE, VOCAB_MULTIPLE, Tokenizer, dataset_tokenizer, model_vocab_size

# ----------------------------------------------------------------------------------------------------------- config
# I/O
out_dir = "out"                # ckpt.pt (or step_N/ under FSDP), metrics.jsonl and loss.png go here
eval_interval = 140            # evaluate (and checkpoint) every this many iterations
eval_iters = 12                # batches per split in each evaluation
log_interval = 25              # a log line (loss, lr, tokens/s, MFU) every this many iterations
eval_only = False              # evaluate once and stop
always_save_checkpoint = True  # save at every evaluation, not only when val loss improves
init_from = "scratch"          # 'scratch', 'resume' (out_dir's run), or new-phase weights: a run, ckpt.pt or hf:FOLDER
overwrite = False              # let a scratch run replace the checkpoint already in out_dir
dry_run = False                # print parameters, FLOPs, KV cache and the memory plan for this config, then exit
kv_context = 8192              # context length of the dry run's KV-cache report
# data
data_root = "data"             # folder holding the dataset folders
dataset = "shakespeare_char"   # a folder in data_root with train_*.bin / val_*.bin shards and tokenizer.json
datasets = {}                  # {name: weight} mixes several prepared datasets; overrides `dataset` when set
batch_size = 32                # micro-batch per device
block_size = 128               # context length
gradient_accumulation_steps = 1  # micro-batches per optimizer step
total_batch_size = 0           # about this many tokens per optimizer step: > 0 derives gradient_accumulation_steps
# model (see GPTConfig in model.py)
n_layer = 4
n_embd = 128
n_head = 4
n_kv_head = 0                  # K/V heads: 1 = MQA, 0 = n_head (MHA), in between = GQA
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
moe_aux_alpha = 1e-4           # sequence-wise balance loss weight (0 disables)
logit_softcap = 0.0            # > 0: logits = c tanh(logits / c) (Gemma 2, modded-nanogpt); 0 = off
value_embeds = 0               # > 0: k extra token embeddings mixed into V of the first and last k layers
zero_init_proj = False         # residual-stream writers (o_proj, down_proj) start at zero (modded-nanogpt)
attn_impl: Literal[ATTN_IMPLS] = "auto"  # 'auto' (triton on CUDA, sdpa elsewhere): this process's kernel, not saved
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
dpo_ipo = False                # the IPO loss instead of DPO's
# energy and CO2e (nanogpt/energy.py)
pue = energy.DEFAULT_PUE       # data-centre overhead (1.56: Uptime Institute Global Data Center Survey 2024)
carbon_intensity_g_per_kwh = energy.DEFAULT_G_PER_KWH  # grid (366 g CO2/kWh: US utility-scale average 2023, EIA)
power_estimate_w = 0.0         # watts per node when power cannot be measured; 0 = the GPUs' TDP, or 3.75 W per core
projection_gpu = "H100"        # dry run: the GPU of the energy projection (peak FLOPs and TDP from nanogpt/energy.py's table)
projection_mfu = 0.4           # dry run: the MFU of the energy projection
# speedrun
target_val_loss = 0.0          # > 0: stop at the first evaluation whose val loss is at or below this
val_tokens = 0                 # > 0: val loss over exactly the first val_tokens tokens of the val split, in order
config = configure(globals())
at_least(config, 1, "batch_size", "block_size", "eval_interval", "log_interval", "eval_iters",
         "gradient_accumulation_steps", "n_layer", "n_embd", "n_head", "ac_every", "keep_checkpoints", "muon_ns_steps")
at_least(config, 0, "max_iters", "warmup_iters", "lr_decay_iters", "total_batch_size", "grad_clip", "weight_decay",
         "muon_momentum_warmup", "target_val_loss", "logit_softcap", "val_tokens", "carbon_intensity_g_per_kwh",
         "power_estimate_w")
at_least(config, 1, "pue")
require(0 < projection_mfu <= 1, f"projection_mfu must be in (0, 1], got {projection_mfu}")
require(0 <= muon_momentum_start < 1 and 0 <= muon_momentum < 1, "Muon momenta must be in [0, 1)")
require(0 <= dropout < 1, f"dropout must be in [0, 1), got {dropout}")
require(dpo_beta > 0 and 0 <= dpo_label_smoothing < 0.5 and not (dpo_ipo and dpo_label_smoothing),
        "need dpo_beta > 0, 0 <= dpo_label_smoothing < 0.5, and no label smoothing with dpo_ipo")
require(0 <= wsd_decay_frac <= 1, f"wsd_decay_frac must be in [0, 1], got {wsd_decay_frac}")
require(learning_rate > 0 and 0 <= min_lr <= learning_rate, "need 0 < learning_rate and 0 <= min_lr <= learning_rate")
require(init_from in ("scratch", "resume") or os.path.exists(init_from.removeprefix("hf:")),
        f"init_from must be 'scratch', 'resume', a run folder or ckpt.pt, or hf:FOLDER (a Hugging Face model); "
        f"{init_from!r} is none of them")
require(not os.path.exists(out_dir) or os.path.isdir(out_dir), f"out_dir {out_dir!r} is a file: name a folder")
for name in datasets or [dataset]:  # a name, not a path: nothing outside data_root is read or run
    require(re.fullmatch(r"[\w.-]+", name) and name.strip(".") != "", f"dataset names are folder names in data_root "
            f"(letters, digits, '_', '-', '.'), got {name!r}")
try:  # the architecture's own checks, before anything runs (the vocabulary comes with the data)
    GPTConfig(**{f.name: config[f.name] for f in fields(GPTConfig) if f.name in config})
except ValueError as e:
    require(False, str(e))

# ------------------------------------------------------------------------------------------------------------ setup
try:
    rank, local_rank, world_size, device, mode = init_distributed(device, backend, fsdp)  # mode: see nanogpt/parallel.py
except ValueError as e:  # a device that is not there or not a device
    require(False, str(e))
master = rank == 0
device_type = device_type_of(device)
if mode == "fsdp" and dtype == "float16":
    finish("fsdp=True with dtype='float16' would train without loss scaling: use bfloat16 (or float32)")
dtype, ptdtype = resolve_dtype(dtype, device_type)
autocast = nullcontext() if mode == "fsdp" else autocast_for(device_type, ptdtype)  # FSDP2 casts by its policy
compile = device_type == "cuda" if compile is None else compile and device_type != "xla"
attn_kernel = resolve_attn_impl(attn_impl, device_type)
torch.manual_seed(seed + rank)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True


def build_meta_model(vocab_size, checkpoint=None):
    """The model on the meta device (shapes only, no memory), with fp8 and activation checkpointing applied."""
    settings = {f.name: config[f.name] for f in fields(GPTConfig) if f.name in config}
    args = dict(architecture_for(settings, given(), checkpoint), vocab_size=vocab_size, block_size=block_size)
    with torch.device("meta"):
        model = GPT(GPTConfig(**args), attn_impl=attn_kernel)
    if fp8:
        if device_type == "xla":
            finish("fp8 is not supported on XLA (its kernels are Triton): set fp8=False")
        skipped = model.convert_fp8(fp8_recipe)
        if skipped and master:
            print(f"fp8: kept in higher precision for their dims (not multiples of 16): {', '.join(skipped)}")
    for i, block in enumerate(model.blocks):
        selected = activation_checkpoint == "selective" and i % ac_every == 0
        block.checkpoint = activation_checkpoint == "full" or selected
    return model


def plan_memory(model):
    """(per-GPU memory plan, GPU memory in GiB or None): planned for a bf16 GPU run, whatever runs it now."""
    plan = memory_plan(model, batch_size, block_size, world_size, fsdp, activation_checkpoint, ac_every,
                       act_bytes=4 if dtype == "float32" and device_type == "cuda" else 2,
                       optimizer_bytes=state_bytes(optimizer, model, muon_normalize))
    detected = torch.cuda.get_device_properties(device).total_memory / 2**30 if device_type == "cuda" else None
    gpu = gpu_mem_gb or detected
    return plan, gpu


def dry_run_vocab_size():
    """The model vocabulary of the configured dataset when it is prepared, else GPT-2's (a plan needs no data)."""
    try:
        return model_vocab_size(Tokenizer.for_dataset(os.path.join(data_root, next(iter(datasets or {dataset: 1})))))
    except (OSError, ValueError):
        return -(-GPT2_VOCAB_SIZE // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


if total_batch_size:  # the accumulation that comes closest to the requested tokens per step
    gradient_accumulation_steps = max(1, round(total_batch_size / (batch_size * block_size * world_size)))
tokens_per_iter = gradient_accumulation_steps * world_size * batch_size * block_size

if dry_run:
    meta_model = build_meta_model(dry_run_vocab_size())
    if master:
        print_model_report(meta_model, block_size, kv_context)
        print(f"memory per GPU, world size {world_size}, batch_size {batch_size}, fsdp={fsdp}, "
              f"activation_checkpoint={activation_checkpoint!r}:")
        print(format_plan(*plan_memory(meta_model)))
        try:
            run_flops = meta_model.flops_per_token(block_size) * tokens_per_iter * max_iters
            print(energy.describe_projection(run_flops, world_size, projection_gpu, projection_mfu, pue,
                                             carbon_intensity_g_per_kwh))
        except ValueError as e:  # an unknown projection_gpu
            finish(str(e))
    finish()
meter = energy.Meter(energy.power_source(device_type, local_rank, power_estimate_w))  # this node, from now on

# ------------------------------------------------------------------------------------------------------------- data


AUTO_PREPARED = ("shakespeare_char", "shakespeare")  # small enough to prepare unasked; others print their command


def dataset_dirs():
    """(folders, weights) of the configured dataset or mixture; prepares the tiny-Shakespeare sets when missing."""
    mix = datasets or {dataset: 1.0}
    dirs = [os.path.join(data_root, name) for name in mix]
    for name, d in zip(mix, dirs):
        missing = not any(f.startswith("train_") for f in os.listdir(d)) if os.path.isdir(d) else True
        if missing and master and name in AUTO_PREPARED:
            script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", name, "prepare.py")
            print(f"no shards in {d}: running {script}")
            if subprocess.run([sys.executable, script, "--out_dir", d]).returncode != 0:
                finish(f"could not prepare {name} (the reason is above)")
    barrier()
    return dirs, list(mix.values())


if init_from != "resume" and has_checkpoint(out_dir) and not overwrite:
    finish(f"{out_dir} already holds a trained checkpoint: continue it with --init_from=resume, train into another "
           "--out_dir, or pass --overwrite=True to replace it")
if master:
    os.makedirs(out_dir, exist_ok=True)
    stale = remove_stale_writes(out_dir)
    if stale:
        print(f"removed unfinished checkpoint writes of killed runs in {out_dir}: {', '.join(stale)}")
data_dirs, mix_weights = dataset_dirs()
try:
    train_loader = BatchLoader(data_dirs, "train", batch_size, block_size, rank, world_size, seed, mix_weights)
    eval_loaders = {split: BatchLoader(data_dirs, split, batch_size, block_size, rank, world_size, seed + 7,
                                       mix_weights) for split in ("train", "val")}
    if val_tokens:  # a fixed protocol: exactly the first val_tokens of the val split, every one predicted once
        eval_loaders["val"] = PrefixLoader(data_dirs[0], "val", val_tokens, batch_size, block_size, rank, world_size)
    tokenizer = dataset_tokenizer(data_dirs)
except (OSError, ValueError) as e:  # missing or corrupt shards, no tokenizer record: the message says what to do
    finish(str(e))
eval_starts = {split: loader.state_dict() for split, loader in eval_loaders.items()}  # rewound to at every eval


def get_batch(loader):
    return shard_batch(mode, *loader.next_batch(device))

# ------------------------------------------------------------------------------------------------------------ model


def build_model(vocab_size, checkpoint=None):
    """Build on the meta device (the architecture of `checkpoint` when given), check the memory plan, shard with
    FSDP2 if asked, then materialise and initialise on `device` (each rank only its shard), and load the
    checkpoint's weights if it has them."""
    model = build_meta_model(vocab_size, checkpoint)
    plan, gpu = plan_memory(model)
    if gpu and not fits(plan, gpu):
        print(format_plan(plan, gpu))
        finish("this run does not fit in GPU memory; change one of:\n  - " +
               "\n  - ".join(advice(plan, gpu, fsdp, world_size, activation_checkpoint)))
    if mode == "fsdp":
        shard_fsdp2(model, ptdtype, compile)
    model.to_empty(device=device)
    if model.config.tie_embeddings and mode != "fsdp":
        model.lm_head.weight = model.wte.weight  # materialising gave the two modules separate tensors
    torch.manual_seed(seed)  # the same initial weights on every rank
    model.init_weights()
    if checkpoint is not None and "model" in checkpoint:  # (a sharded run's weights load later, with its optimizer)
        check_compatible(checkpoint, model.config)
        state = clean_state_dict(checkpoint["model"])
        if mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        else:
            model.load_state_dict(state)
    torch.manual_seed(seed + rank)
    return model


resume_from = None
if init_from == "resume":
    resume_from = (step_dirs(out_dir) or [None])[-1] if mode == "fsdp" else os.path.join(out_dir, "ckpt.pt")
    if resume_from is None:
        finish(f"init_from='resume' but {out_dir} holds no complete sharded checkpoint (step_*/)")


def load_start(path):
    """A checkpoint to start a new phase from (weights only), adapted to the data's tokenizer: rows for special
    tokens new to it (chat fine-tuning of a base model) start at the mean embedding, and the run says so."""
    checkpoint, note = adapt_checkpoint(read_checkpoint(path), tokenizer.spec, model_vocab_size(tokenizer))
    if note and master:
        print(f"{path}: {note}")
    return checkpoint


checkpoint = None  # a whole ckpt.pt: weights, optimizer and loader state, RNG, config
try:
    if init_from not in ("scratch", "resume"):  # weights only: a new phase with a fresh optimizer and data stream
        checkpoint = load_start(init_from)
    elif resume_from:  # a sharded run's meta.pt holds all but the weights and optimizer
        checkpoint = (read_state(os.path.join(resume_from, "meta.pt")) if mode == "fsdp"
                      else load_checkpoint(resume_from))
        if checkpoint.get("tokenizer", tokenizer.spec) != tokenizer.spec:
            raise ValueError(f"the checkpoint was trained with the {Tokenizer(checkpoint['tokenizer']).describe()} "
                             f"tokenizer but the data is {tokenizer.describe()}: use the data it was trained on")
    vocab_size = checkpoint["model_args"]["vocab_size"] if checkpoint else model_vocab_size(tokenizer)
    model = build_model(vocab_size, checkpoint)
    # DPO's frozen model is the phase's starting point (for a resumed run: the one its checkpoint names)
    reference_from = checkpoint.get("reference_from", "scratch") if init_from == "resume" else init_from
    if train_loader.pairs:
        start = load_start(reference_from) if reference_from not in ("scratch", "resume") else None
        reference = build_model(vocab_size, start).eval().requires_grad_(False)
except (OSError, RuntimeError, ValueError) as e:  # the message says which file and what to do
    finish(str(e))
if master:
    print(f"{model.num_params():,} parameters ({model.num_params(active=True):,} active), "
          f"{tokens_per_iter:,} tokens/iter, device {device} {dtype}, {mode} over {world_size} process(es), "
          f"attention {attn_kernel}, activation_checkpoint={activation_checkpoint!r}")

# -------------------------------------------------------------------------------------------------------- optimizer
opt = build_optimizer(optimizer, model, learning_rate, weight_decay, (beta1, beta2), lr_scales, device_type,
                      muon=dict(momentum=muon_momentum, nesterov=muon_nesterov, ns_steps=muon_ns_steps,
                                coefficients=muon_coefficients, normalize=muon_normalize, normalize_beta2=beta2))
scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16" and device_type == "cuda" and mode != "fsdp")
iter_num, best_val_loss, train_seconds, joules_before = 0, float("inf"), 0.0, 0.0  # joules: earlier phases
if init_from == "resume":
    state = dict(checkpoint, **load_sharded(resume_from, model, opt)) if mode == "fsdp" else checkpoint
    needed = {"loader", "iter_num", "best_val_loss", "rng"} | ({"optimizer"} if mode != "fsdp" else set())
    missing = sorted(needed - set(state))
    if missing:
        finish(f"{resume_from} holds no training state to resume ({', '.join(missing)} missing): start a new phase "
               f"from its weights with --init_from={resume_from} (and another out_dir)")
    try:
        if mode != "fsdp":
            load_optimizer_state(opt, state["optimizer"])
        train_loader.load_state_dict(state["loader"])
    except (KeyError, ValueError) as e:
        finish(f"{resume_from}: cannot resume from it ({e})")
    iter_num, best_val_loss, train_seconds = state["iter_num"], state["best_val_loss"], state.get("train_seconds", 0.0)
    joules_before = state.get("energy_joules", 0.0)
    torch.set_rng_state(state["rng"]["torch"])
    if device_type == "cuda" and state["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"].cpu())
    if master:
        print(f"resumed from {resume_from} at iter {iter_num}")
        metrics.keep_until(out_dir, iter_num)  # drop what the interrupted run logged after its checkpoint
elif master and os.path.exists(os.path.join(out_dir, metrics.FILE)):
    os.remove(os.path.join(out_dir, metrics.FILE))  # a fresh run starts a fresh log
checkpoint = state = None

raw_model = model
model = wrap_for_training(model, mode, compile, device)
if mode == "xla_spmd" and master:
    print(describe_xla_sharding(model))
flops_per_iter = raw_model.flops_per_token(block_size) * tokens_per_iter
peak = (peak_flops or device_peak_flops(device)) * world_size


def run_joules():
    """Energy of the whole run so far: every node, earlier phases of a resumed run included (a collective)."""
    joules = torch.tensor(meter.joules(), dtype=torch.float64, device=device if device_type == "cuda" else "cpu")
    return joules_before + sum_over_ranks(joules).item()


objective_kind = "dpo" if train_loader.pairs else "next_token"
objective = make_objective(objective_kind, model, gradient_accumulation_steps,
                           reference if train_loader.pairs else None, dpo_beta, dpo_label_smoothing, dpo_ipo)


def batch_weight(batches):
    return batch_weights(objective_kind, batches, world_size)


@torch.no_grad()
def estimate_loss():
    """{split: metrics} over eval_iters fixed batches of each split (loaders rewound: the same batches every eval):
    the mean loss over the counted targets, or for pairs the mean DPO metrics."""
    model.eval()
    out = {}
    for split, loader in eval_loaders.items():
        loader.load_state_dict(eval_starts[split])
        batches = [get_batch(loader) for _ in range(getattr(loader, "batches", eval_iters))]
        weight, _ = batch_weight(batches)
        totals = {}
        for batch in batches:
            with autocast:
                _, batch_metrics = objective(batch, weight)
            for k, v in batch_metrics.items():
                totals[k] = totals.get(k, 0.0) + v * weight  # summed on the device: one host sync per split
            cut_xla_graph(device)
        out[split] = {k: mean_over_ranks(v).item() for k, v in totals.items()}
    model.train()
    return out


def save(val_loss):
    """ckpt.pt (temp file + rename) from rank 0, or under FSDP a sharded step folder written by every rank."""
    meta = {"model_args": {f.name: getattr(raw_model.config, f.name) for f in fields(GPTConfig)}, "config": config,
            "iter_num": iter_num, "best_val_loss": best_val_loss, "val_loss": val_loss, "train_seconds": train_seconds,
            "reference_from": reference_from, "energy_joules": joules,
            "loader": train_loader.state_dict(), "tokenizer": tokenizer.spec,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None}}
    if mode == "fsdp":
        save_sharded(out_dir, iter_num, model, opt, meta, keep=keep_checkpoints)
    elif master:
        try:
            save_checkpoint(to_cpu(dict(meta, model=raw_model.state_dict(), optimizer=opt.state_dict())),
                            os.path.join(out_dir, "ckpt.pt"))
        except OSError as e:  # a full disk, say: the message says so and that the previous checkpoint is kept
            sys.exit(str(e))  # (under torchrun the launcher then stops the other ranks)


# ------------------------------------------------------------------------------------------------------------- loop
t_start = t_log = t_train = time.time()  # t_train: when training (not evaluating) last resumed
losses = {}
while True:
    lr = scheduled_lr(iter_num, lr_schedule, learning_rate, min_lr, warmup_iters, lr_decay_iters or max_iters,
                      wsd_decay_frac, wsd_shape)
    set_lr(opt, lr, scheduled_momentum(iter_num, muon_momentum_start, muon_momentum, muon_momentum_warmup))

    if iter_num % eval_interval == 0 or iter_num == max_iters:
        t_eval = time.time()
        train_seconds += t_eval - t_train
        evaluated, joules = estimate_loss(), run_joules()
        losses = {split: m["loss"] for split, m in evaluated.items()}
        if master:
            more = {f"val_{k}": v for k, v in evaluated["val"].items() if k != "loss"}  # DPO: rewards, accuracies
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                  + "".join(f", {k} {v:.4f}" for k, v in more.items())
                  + f", {energy.describe(joules, meter.source.label, pue, carbon_intensity_g_per_kwh)}")
            metrics.append(out_dir, {"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                                     **more, "lr": lr, "time": time.time() - t_start, "energy_kwh": energy.kwh(joules),
                                     "co2_kg": energy.co2_kg(joules, pue, carbon_intensity_g_per_kwh)})
            metrics.plot(out_dir)
        if not math.isfinite(losses["val"]):  # the same on every rank: losses are all-reduced
            kept = "the last good checkpoint is kept" if has_checkpoint(out_dir) else "no checkpoint was written yet"
            finish(f"val loss is not finite at iter {iter_num}: stopping, {kept}")
        reached = target_val_loss and losses["val"] <= target_val_loss
        if reached and master:
            print(f"reached val loss {losses['val']:.4f} <= {target_val_loss} at step {iter_num} after "
                  f"{train_seconds:.1f} s of training (eval excluded), {iter_num * tokens_per_iter:,} tokens, "
                  f"world {world_size}")
        if iter_num > 0 and (losses["val"] < best_val_loss or always_save_checkpoint):
            best_val_loss = min(best_val_loss, losses["val"])
            save(losses["val"])
        if eval_only or reached:
            break
        t_train = time.time()
        t_log += t_train - t_eval  # ms/iter and tokens/s count training steps only
    if iter_num >= max_iters:
        break

    batches = [get_batch(train_loader) for _ in range(gradient_accumulation_steps)]
    weight, trained_tokens = batch_weight(batches)
    step_metrics = {}
    for micro_step, batch in enumerate(batches):
        with gradient_sync(model, micro_step == gradient_accumulation_steps - 1), autocast:
            loss, batch_metrics = objective(batch, weight)
        scaler.scale(loss).backward()
        for k, v in batch_metrics.items():
            step_metrics[k] = step_metrics.get(k, 0.0) + v * weight
    if grad_clip:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    loads = raw_model.expert_loads()  # MoE only: expert biases follow the step's loads over every rank
    imbalance = raw_model.update_expert_biases(sum_over_ranks(loads)) if loads is not None else None
    cut_xla_graph(device)
    iter_num += 1

    if iter_num % log_interval == 0:
        # means over ranks: the metrics of the whole global batch; .item() is the step's only host sync
        logged = {k: mean_over_ranks(v).item() for k, v in step_metrics.items()}
        loss_value, joules = logged.pop("loss"), run_joules()
        if not math.isfinite(loss_value):  # the same on every rank (all-reduced), so every rank stops here
            kept = "the last good checkpoint is kept" if has_checkpoint(out_dir) else "no checkpoint was written yet"
            finish(f"loss is not finite ({loss_value}) at iter {iter_num}: stopping, {kept}; "
                   "try a lower learning_rate or grad_clip")
    if iter_num % log_interval == 0 and master:
        dt = (time.time() - t_log) / log_interval
        t_log = time.time()
        mfu = flops_per_iter / dt / peak if peak else None
        imbalance = imbalance.item() if imbalance is not None else None
        moe = f", expert load max/mean {imbalance:.2f}" if imbalance is not None else ""
        compilations = xla_compilations() if device_type == "xla" else None
        xla = f", {compilations} XLA compilations" if compilations is not None and iter_num <= 10 * log_interval else ""
        mixture = f", mixture {[round(f, 3) for f in train_loader.mixture()]}" if len(data_dirs) > 1 else ""
        if trained_tokens is not None and trained_tokens.item() < tokens_per_iter:  # masked (SFT) data
            logged["trained_tokens"] = int(trained_tokens.item())
        extra = "".join(f", {k} {v:.4f}" if isinstance(v, float) else f", {k} {v:,}" for k, v in logged.items())
        print(f"iter {iter_num}: loss {loss_value:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter, "
              f"{tokens_per_iter / dt:,.0f} tok/s, mfu {f'{100 * mfu:.1f}%' if mfu else 'n/a'}{extra}, "
              f"{energy.kwh(joules):.4g} kWh{moe}{mixture}{xla}")
        metrics.append(out_dir, {"iter": iter_num, "loss": loss_value, "lr": lr, "ms_per_iter": dt * 1000,
                                 "tokens_per_s": tokens_per_iter / dt, "mfu": mfu, "expert_imbalance": imbalance,
                                 "energy_kwh": energy.kwh(joules),
                                 "co2_kg": energy.co2_kg(joules, pue, carbon_intensity_g_per_kwh),
                                 **logged, "mixture": train_loader.mixture(), "xla_compilations": compilations})

joules = run_joules()
meter.stop()
if master and losses:
    print(f"final val loss {losses['val']:.4f} at iter {iter_num} ({time.time() - t_start:.1f} s, "
          f"{energy.describe(joules, meter.source.label, pue, carbon_intensity_g_per_kwh)})")
finish()
