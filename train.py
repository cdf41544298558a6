"""Train a GPT. The defaults are the quick run: character-level tiny Shakespeare, about two minutes on a 2-core CPU.

    python train.py                                          # the quick run (prepares its data when missing)
    python train.py config/train_shakespeare_char.py --max_iters=500
    torchrun --standalone --nproc_per_node=8 train.py config/train_7b.py --batch_size=8
    python train.py config/train_7b.py --dry_run=True        # parameter count, FLOPs and KV cache, built on meta

Reads top to bottom: settings, setup, data, model, optimizer, loop. Parallelism lives in parallel.py, the
optimizer and schedule in optim.py, checkpoints in checkpoint.py, the metrics log and plot in metrics.py.
"""
import math
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import fields

import torch

import metrics
from checkpoint import (check_compatible, clean_state_dict, load_checkpoint, load_sharded, save_checkpoint,
                        save_sharded, step_dirs, to_cpu)
from configurator import configure
from data.loader import BatchLoader
from memory import advice, fits, format_plan, memory_plan, print_model_report
from model import GPT, GPTConfig
from optim import build_optimizer, load_optimizer_state, scheduled_lr, set_lr, state_bytes
from parallel import (cut_xla_graph, describe_xla_sharding, finish, gradient_sync, init_distributed, mean_over_ranks,
                      barrier, shard_batch, shard_fsdp2, wrap_for_training, xla_compilations)
from runtime import autocast_for, device_type as device_type_of, peak_flops as device_peak_flops
from runtime import resolve_attn_impl, resolve_dtype
from tokenizer import Tokenizer

# ----------------------------------------------------------------------------------------------------------- config
# I/O
out_dir = "out"
eval_interval = 125
eval_iters = 12
log_interval = 25
eval_only = False
always_save_checkpoint = True
init_from = "scratch"          # 'scratch', 'resume' (out_dir/ckpt.pt), or a path to a ckpt.pt (weights only)
dry_run = False                # print parameters, FLOPs and KV cache for this config, then exit
kv_context = 8192              # context length of the dry run's KV-cache report
# data
data_root = "data"
dataset = "shakespeare_char"
datasets = {}                  # {name: weight} mixes several prepared datasets; overrides `dataset` when set
batch_size = 32                # micro-batch per device
block_size = 128
gradient_accumulation_steps = 1
total_batch_size = 0           # about this many tokens per optimizer step: > 0 derives gradient_accumulation_steps
# model (see GPTConfig in model.py)
n_layer = 4
n_embd = 128
n_head = 4
n_kv_head = 0
mlp = "relu2"
mlp_hidden = 0
qk_norm = True
tie_embeddings = False
dropout = 0.0
rope_theta = 10000.0
attn_pattern = "G"
local_window = 1024
kv_share = 1
share_global_kv = False
n_expert = 0
n_expert_active = 2
n_shared_expert = 1
moe_hidden = 0
n_dense_layers = 1
moe_bias_gamma = 1e-3
moe_aux_alpha = 1e-4
attn_impl = "auto"             # 'auto' (triton on CUDA, sdpa elsewhere), 'triton' or 'sdpa'
# optimizer and schedule (optim.py)
optimizer = "adamw"            # 'adamw' (optim.py)
learning_rate = 4e-3
min_lr = 4e-4
max_iters = 500
lr_schedule = "cosine"         # 'cosine' or 'wsd' (warmup-stable-decay)
warmup_iters = 50
lr_decay_iters = 0             # 0 = max_iters
wsd_decay_frac = 0.2           # wsd: the final fraction of iterations that decays to min_lr
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
lr_scales = {}                 # lr multipliers per parameter group, e.g. {'embedding': 5.0}; groups in optim.py
# system
device = "auto"                # 'auto', 'cpu', 'cuda', 'cuda:1', ...
dtype = "auto"                 # 'auto' (bfloat16 on CUDA, float32 elsewhere), 'float32', 'bfloat16', 'float16'
compile = None                 # None = on for CUDA, off elsewhere
seed = 1337
peak_flops = 0.0               # for MFU; 0 = look the device up
backend = "auto"               # distributed backend: 'auto' (nccl on CUDA, gloo on CPU)
fp8 = False                    # attention projections, MLPs and experts in fp8 (kernels/fp8.py)
fp8_recipe = "tensorwise"      # 'tensorwise', 'rowwise' or 'blockwise' (DeepSeek-V3: 1x128 / 128x128 scales)
# scale-out
fsdp = False                   # FSDP2: shard params, grads and optimizer state (checkpoints become step_N/ folders)
activation_checkpoint = "none" # 'none', 'full' (every block) or 'selective' (every ac_every-th block)
ac_every = 2
keep_checkpoints = 2           # sharded checkpoints kept in out_dir
gpu_mem_gb = 0.0               # memory plan: GPU memory to plan for; 0 = the detected GPU
config = configure(globals())

# ------------------------------------------------------------------------------------------------------------ setup
rank, local_rank, world_size, device, mode = init_distributed(device, backend, fsdp)  # mode: see parallel.py
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


def build_meta_model(vocab_size):
    """The model on the meta device (shapes only, no memory), with fp8 and activation checkpointing applied."""
    args = {f.name: config[f.name] for f in fields(GPTConfig) if f.name in config}
    with torch.device("meta"):
        model = GPT(GPTConfig(**dict(args, vocab_size=vocab_size, block_size=block_size)), attn_impl=attn_kernel)
    if fp8:
        if device_type == "xla":
            finish("fp8 is not supported on XLA (its kernels are Triton): set fp8=False")
        skipped = model.convert_fp8(fp8_recipe)
        if skipped and master:
            print(f"fp8: kept in higher precision for their dims (not multiples of 16): {', '.join(skipped)}")
    for i, block in enumerate(model.blocks):
        block.checkpoint = activation_checkpoint == "full" or (activation_checkpoint == "selective" and i % ac_every == 0)
    return model


def plan_memory(model):
    """(per-GPU memory plan, GPU memory in GiB or None): planned for a bf16 GPU run, whatever runs it now."""
    plan = memory_plan(model, batch_size, block_size, world_size, fsdp, activation_checkpoint, ac_every,
                       act_bytes=4 if dtype == "float32" and device_type == "cuda" else 2,
                       optimizer_bytes=state_bytes(optimizer, model))
    gpu = gpu_mem_gb or (torch.cuda.get_device_properties(device).total_memory / 2**30 if device_type == "cuda" else None)
    return plan, gpu


def dataset_vocab_size():
    """Vocabulary of the configured dataset without reading its shards: meta.pkl's characters, else GPT-2's."""
    folder = os.path.join(data_root, next(iter(datasets)) if datasets else dataset)
    return Tokenizer.for_dataset(folder).vocab_size if os.path.exists(os.path.join(folder, "meta.pkl")) else 50257


if dry_run:
    meta_model = build_meta_model(dataset_vocab_size())
    if master:
        print_model_report(meta_model, block_size, kv_context)
        print(f"memory per GPU, world size {world_size}, batch_size {batch_size}, fsdp={fsdp}, "
              f"activation_checkpoint={activation_checkpoint!r}:")
        print(format_plan(*plan_memory(meta_model)))
    finish()

# ------------------------------------------------------------------------------------------------------------- data


def dataset_dirs():
    """(folders, weights) of the configured dataset or mixture; prepares the shakespeare sets when missing."""
    mix = datasets or {dataset: 1.0}
    dirs = [os.path.join(data_root, name) for name in mix]
    for name, d in zip(mix, dirs):
        script = os.path.join(data_root, name, "prepare.py")
        missing = not any(f.startswith("train_") for f in os.listdir(d)) if os.path.isdir(d) else True
        if missing and master and os.path.exists(script):
            print(f"no shards in {d}: running {script}")
            subprocess.run([sys.executable, script], check=True)
    barrier()
    return dirs, list(mix.values())


if master:
    os.makedirs(out_dir, exist_ok=True)
data_dirs, mix_weights = dataset_dirs()
try:
    train_loader = BatchLoader(data_dirs, "train", batch_size, block_size, rank, world_size, seed, mix_weights)
    eval_loaders = {split: BatchLoader(data_dirs, split, batch_size, block_size, rank, world_size, seed + 7,
                                       mix_weights) for split in ("train", "val")}
except (OSError, ValueError) as e:  # missing or corrupt shards: the message names the file and the fix
    finish(str(e))
eval_starts = {split: loader.state_dict() for split, loader in eval_loaders.items()}  # rewound to at every eval
tokenizer = Tokenizer.for_dataset(data_dirs[0])
if total_batch_size:  # the accumulation that comes closest to the requested tokens per step
    gradient_accumulation_steps = max(1, round(total_batch_size / (batch_size * block_size * world_size)))
tokens_per_iter = gradient_accumulation_steps * world_size * batch_size * block_size


def get_batch(loader):
    return shard_batch(mode, *loader.next_batch(device))

# ------------------------------------------------------------------------------------------------------------ model


def build_model(vocab_size, checkpoint=None):
    """Build on the meta device, check the memory plan, shard with FSDP2 if asked, then materialise and initialise
    on `device` (each rank only its shard), and load `checkpoint`'s weights if given."""
    model = build_meta_model(vocab_size)
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
    if checkpoint is not None:
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
checkpoint = None  # a whole ckpt.pt: weights, optimizer and loader state, RNG, config
try:
    if init_from not in ("scratch", "resume"):  # weights only: a new phase with a fresh optimizer and data stream
        checkpoint = load_checkpoint(init_from)
    elif resume_from and mode != "fsdp":
        checkpoint = load_checkpoint(resume_from)
    model = build_model(tokenizer.vocab_size, checkpoint)
except (OSError, RuntimeError, ValueError) as e:  # the message says which file and what to do
    finish(str(e))
if master:
    print(f"{model.num_params():,} parameters ({model.num_params(active=True):,} active), "
          f"{tokens_per_iter:,} tokens/iter, device {device} {dtype}, {mode} over {world_size} process(es), "
          f"attention {attn_kernel}, activation_checkpoint={activation_checkpoint!r}")

# -------------------------------------------------------------------------------------------------------- optimizer
opt = build_optimizer(optimizer, model, learning_rate, weight_decay, (beta1, beta2), lr_scales, device_type)
scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16" and device_type == "cuda" and mode != "fsdp")
iter_num, best_val_loss = 0, float("inf")
if init_from == "resume":
    state = load_sharded(resume_from, model, opt) if mode == "fsdp" else checkpoint
    try:
        if mode != "fsdp":
            load_optimizer_state(opt, state["optimizer"])
        train_loader.load_state_dict(state["loader"])
    except (KeyError, ValueError) as e:
        finish(f"{resume_from}: cannot resume from it ({e})")
    iter_num, best_val_loss = state["iter_num"], state["best_val_loss"]
    torch.set_rng_state(state["rng"]["torch"])
    if device_type == "cuda" and state["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"].cpu())
    if master:
        print(f"resumed from {resume_from} at iter {iter_num}")
elif master and os.path.exists(os.path.join(out_dir, metrics.FILE)):
    os.remove(os.path.join(out_dir, metrics.FILE))  # a fresh run starts a fresh log
checkpoint = state = None

raw_model = model
model = wrap_for_training(model, mode, compile, device)
if mode == "xla_spmd" and master:
    print(describe_xla_sharding(model))
flops_per_iter = raw_model.flops_per_token(block_size) * tokens_per_iter
peak = (peak_flops or device_peak_flops(device)) * world_size


@torch.no_grad()
def estimate_loss():
    """Mean loss over eval_iters fixed batches of each split (loaders rewound: the same batches every eval)."""
    model.eval()
    out = {}
    for split, loader in eval_loaders.items():
        loader.load_state_dict(eval_starts[split])
        total = torch.zeros((), device=device)
        for _ in range(eval_iters):
            x, y = get_batch(loader)
            with autocast:
                _, loss = model(x, y)
            total += loss.float()  # summed on the device: one host sync per split
            cut_xla_graph(device)
        out[split] = mean_over_ranks(total / eval_iters).item()
    model.train()
    return out


def save(val_loss):
    """ckpt.pt (temp file + rename) from rank 0, or under FSDP a sharded step folder written by every rank."""
    meta = {"model_args": {f.name: getattr(raw_model.config, f.name) for f in fields(GPTConfig)}, "config": config,
            "iter_num": iter_num, "best_val_loss": best_val_loss, "val_loss": val_loss,
            "loader": train_loader.state_dict(), "tokenizer": tokenizer.spec,
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None}}
    if mode == "fsdp":
        save_sharded(out_dir, iter_num, model, opt, meta, keep=keep_checkpoints)
    elif master:
        save_checkpoint(to_cpu(dict(meta, model=raw_model.state_dict(), optimizer=opt.state_dict())),
                        os.path.join(out_dir, "ckpt.pt"))


# ------------------------------------------------------------------------------------------------------------- loop
t_start = t_log = time.time()
losses = {}
while True:
    lr = scheduled_lr(iter_num, lr_schedule, learning_rate, min_lr, warmup_iters, lr_decay_iters or max_iters,
                      wsd_decay_frac)
    set_lr(opt, lr)

    if iter_num % eval_interval == 0 or iter_num == max_iters:
        losses = estimate_loss()
        if master:
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            metrics.append(out_dir, {"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                                     "time": time.time() - t_start})
            metrics.plot(out_dir)
        if not math.isfinite(losses["val"]):  # the same on every rank: losses are all-reduced
            finish("val loss is not finite: stopping without overwriting the last checkpoint")
        if iter_num > 0 and (losses["val"] < best_val_loss or always_save_checkpoint):
            best_val_loss = min(best_val_loss, losses["val"])
            save(losses["val"])
        if eval_only:
            break
    if iter_num >= max_iters:
        break

    for micro_step in range(gradient_accumulation_steps):
        x, y = get_batch(train_loader)
        with gradient_sync(model, micro_step == gradient_accumulation_steps - 1), autocast:
            _, loss = model(x, y)
            loss = loss / gradient_accumulation_steps
        scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    imbalance = raw_model.update_expert_biases()  # MoE only: expert biases follow the step's loads
    cut_xla_graph(device)
    iter_num += 1

    if iter_num % log_interval == 0:
        # the mean over ranks is the loss of the whole global micro-batch; .item() is the step's only host sync
        loss_value = mean_over_ranks(loss.detach() * gradient_accumulation_steps).item()
        if not math.isfinite(loss_value):  # the same on every rank (all-reduced), so every rank stops here
            finish(f"loss is not finite ({loss_value}) at iter {iter_num}: stopping, the last good checkpoint is kept; "
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
        print(f"iter {iter_num}: loss {loss_value:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter, "
              f"{tokens_per_iter / dt:,.0f} tok/s, mfu {f'{100 * mfu:.1f}%' if mfu else 'n/a'}{moe}{mixture}{xla}")
        metrics.append(out_dir, {"iter": iter_num, "loss": loss_value, "lr": lr, "ms_per_iter": dt * 1000,
                                 "tokens_per_s": tokens_per_iter / dt, "mfu": mfu, "expert_imbalance": imbalance,
                                 "mixture": train_loader.mixture(), "xla_compilations": compilations})

if master and losses:
    print(f"final val loss {losses['val']:.4f} at iter {iter_num} ({time.time() - t_start:.1f} s)")
finish()
