"""Train a GPT. The defaults are the quick run: character-level tiny Shakespeare, about 3 minutes on a 2-core CPU.

    python train.py                                          # the quick run (prepares its data when missing)
    python train.py config/train_shakespeare_char.py --max_iters=500
    torchrun --standalone --nproc_per_node=8 train.py config/train_7b.py --batch_size=8
    python train.py config/train_7b.py --dry_run=True        # parameter count, FLOPs and KV cache, built on meta
"""
import functools
import json
import math
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import clean_state_dict, load_checkpoint, load_sharded, save_checkpoint, save_sharded, step_dirs
from configurator import configure
from data.loader import BatchLoader
from memory import advice, fits, format_plan, memory_plan
from model import GPT, GPTConfig, KVCache
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
# optimizer and schedule
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
# ------------------------------------------------------------------------------------------------------------------


def setup_distributed():
    """(rank, local_rank, world_size, device); initialises the process group under torchrun."""
    global device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "xla":
        return 0, 0, 1, setup_xla()
    if "RANK" not in os.environ:
        if not fsdp:
            return 0, 0, 1, device
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29517"))  # FSDP needs a process group, even of one
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend=("nccl" if device.startswith("cuda") else "gloo") if backend == "auto" else backend)
    return rank, local_rank, world, device


def finish(message=None):
    """Exit on every rank together (message: error text, None: success). Ranks first wait for rank 0, which may
    still be plotting or saving: one that tears down the process group early can abort the others at exit."""
    if dist.is_initialized():
        dist.barrier(device_ids=[local_rank] if device_type == "cuda" else None)
        dist.destroy_process_group()
    sys.exit(message)


def setup_xla():
    """torch_xla is imported on this path only. SPMD (fsdp=True) must be switched on before any XLA tensor exists."""
    import torch_xla
    import torch_xla.runtime as xr
    if fsdp:
        xr.use_spmd()
    return str(torch_xla.device())


def step_barrier():
    """On XLA, cut the lazy graph here (one compiled program per step); elsewhere nothing."""
    if device_type == "xla":
        import torch_xla
        torch_xla.sync()


def xla_compilations():
    import torch_xla.debug.metrics as met
    data = met.metric_data("CompileTime")
    return data[0] if data else 0


def wrap_fsdpv2(model):
    """XLA SPMD: a 1-D mesh over all devices; every block sharded with FSDPv2, batches split along the mesh."""
    import numpy as np
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr
    from torch_xla.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from torch_xla.experimental.spmd_fully_sharded_data_parallel import SpmdFullyShardedDataParallel

    from model import Block
    mesh = xs.Mesh(np.arange(xr.global_runtime_device_count()), (xr.global_runtime_device_count(), 1), ("fsdp", "model"))
    xs.set_global_mesh(mesh)

    def shard_output(output, mesh):  # the model returns (logits, loss): shard the logits along the batch
        xs.mark_sharding(output[0], mesh, ("fsdp", None, None))
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={Block})
    return SpmdFullyShardedDataParallel(model, mesh=mesh, auto_wrap_policy=policy, shard_output=shard_output)


def get_batch(loader):
    x, y = loader.next_batch(device)
    if xla_fsdp:  # SPMD: one process feeds all devices; split the batch across them
        import torch_xla.distributed.spmd as xs
        for t in (x, y):
            xs.mark_sharding(t, xs.get_global_mesh(), ("fsdp", None))
    return x, y


def to_cpu(obj):
    """A state with every tensor on the CPU (XLA tensors must leave the device before torch.save)."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def model_config(vocab_size):
    args = {f.name: config[f.name] for f in fields(GPTConfig) if f.name in config}
    args.update(vocab_size=vocab_size, block_size=block_size)
    args["attn_impl"] = ("triton" if device_type == "cuda" else "sdpa") if attn_impl == "auto" else attn_impl
    return GPTConfig(**args)


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
    if ddp:
        dist.barrier()
    return dirs, list(mix.values())


def get_lr(it):
    decay_iters = lr_decay_iters or max_iters
    if it >= decay_iters:
        return min_lr
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if lr_schedule == "wsd":
        decay_start = max(warmup_iters, int(decay_iters * (1 - wsd_decay_frac)))
        if it < decay_start:
            return learning_rate
        return min_lr + (learning_rate - min_lr) * (1 - (it - decay_start) / (decay_iters - decay_start))
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def device_peak_flops():
    """Dense bf16 peak of the device (for MFU); 0 when unknown."""
    if peak_flops or device_type != "cuda":
        return peak_flops
    name = torch.cuda.get_device_name()
    table = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12, "4090": 165e12}
    return next((v for k, v in table.items() if k in name), 0.0)


@torch.no_grad()
def estimate_loss():
    """Mean loss over eval_iters fixed batches of each split (loaders rewound: the same batches every eval)."""
    model.eval()
    out = {}
    for split, (loader, start) in eval_loaders.items():
        loader.load_state_dict(start)
        total = torch.zeros((), device=device)
        for _ in range(eval_iters):
            x, y = get_batch(loader)
            with autocast:
                _, loss = model(x, y)
            total += loss.float()  # summed on the device: one host sync per split
            step_barrier()
        mean = total / eval_iters
        if ddp:
            dist.all_reduce(mean, op=dist.ReduceOp.AVG)
        out[split] = mean.item()
    model.train()
    return out


def plot_metrics(path_png, path_jsonl):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(path_jsonl)]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "val_loss" in r]
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=(3, 1))
    ax.plot([r["iter"] for r in train_rows], [r["loss"] for r in train_rows], alpha=0.5, label="train (batch)")
    ax.plot([r["iter"] for r in eval_rows], [r["train_loss"] for r in eval_rows], "o-", label="train (eval)")
    ax.plot([r["iter"] for r in eval_rows], [r["val_loss"] for r in eval_rows], "o-", label="val")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    ax_lr.plot([r["iter"] for r in train_rows], [r["lr"] for r in train_rows])
    ax_lr.set_xlabel("iteration")
    ax_lr.set_ylabel("lr")
    fig.tight_layout()
    fig.savefig(path_png + ".tmp.png")
    plt.close(fig)
    os.replace(path_png + ".tmp.png", path_png)


def log_metrics(row):
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def print_dry_run(model, cfg):
    """Parameters, FLOPs per token and KV-cache size next to equal-width GQA-8 and MHA baselines."""
    total, active = model.num_params(), model.num_params(active=True)
    embedding = model.wte.weight.numel()
    print(f"parameters: {total + embedding:,} total ({total:,} without the input embedding), {active:,} active")
    print(f"training FLOPs per token at {block_size} context: {model.flops_per_token(block_size) / 1e9:.2f} GFLOP")
    baseline = dict(asdict(cfg), attn_pattern="G", kv_share=1, share_global_kv=False)
    gqa8 = KVCache.bytes_at(GPTConfig(**dict(baseline, n_kv_head=math.gcd(8, cfg.n_head))), kv_context)
    mha = KVCache.bytes_at(GPTConfig(**dict(baseline, n_kv_head=cfg.n_head)), kv_context)
    ours = KVCache.bytes_at(cfg, kv_context)
    print(f"KV cache at {kv_context:,} tokens of context (bf16, one sequence):")
    for name, b in (("this model", ours), ("GQA-8", gqa8), ("MHA", mha)):
        print(f"  {name:10s} {b / kv_context:>10,.0f} bytes/token {b / 2**20:>10,.1f} MiB")
    print(f"  this model needs {gqa8 / ours:.1f}x less than GQA-8 and {mha / ours:.1f}x less than MHA")


def dataset_vocab_size():
    """Vocabulary of the configured dataset without reading its shards: meta.pkl's characters, else GPT-2's."""
    folder = os.path.join(data_root, next(iter(datasets)) if datasets else dataset)
    return Tokenizer.for_dataset(folder).vocab_size if os.path.exists(os.path.join(folder, "meta.pkl")) else 50257


def build_meta_model(vocab_size):
    """The model on the meta device (shapes only, no memory), with fp8 and checkpointing applied."""
    with torch.device("meta"):
        model = GPT(model_config(vocab_size))
    if fp8:
        if device_type == "xla":
            sys.exit("fp8 is not supported on XLA (its kernels are Triton): set fp8=False")
        skipped = model.convert_fp8(fp8_recipe)
        if skipped and master:
            print(f"fp8: kept in higher precision for their dims (not multiples of 16): {', '.join(skipped)}")
    for i, block in enumerate(model.blocks):
        block.checkpoint = activation_checkpoint == "full" or (activation_checkpoint == "selective" and i % ac_every == 0)
    return model


def gpu_memory_gb():
    if gpu_mem_gb:
        return gpu_mem_gb
    return torch.cuda.get_device_properties(device).total_memory / 2**30 if device_type == "cuda" else None


def memory_plan_for(model):
    return memory_plan(model, batch_size, block_size, world_size, fsdp, activation_checkpoint, ac_every,
                       act_bytes=4 if dtype == "float32" and device_type == "cuda" else 2)  # plans for a bf16 GPU run


def build_model(vocab_size, checkpoint=None):
    """Build on the meta device, check the memory plan, shard with FSDP2 if asked, then materialise and initialise
    on `device` (each rank only its shard), and load `checkpoint`'s weights if given."""
    model = build_meta_model(vocab_size)
    plan, gpu = memory_plan_for(model), gpu_memory_gb()
    if gpu and not fits(plan, gpu):
        print(format_plan(plan, gpu))
        sys.exit("this run does not fit in GPU memory; change one of:\n  - " +
                 "\n  - ".join(advice(plan, gpu, fsdp, world_size, activation_checkpoint)))
    if fsdp2:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy(param_dtype=ptdtype, reduce_dtype=torch.float32)
        for block in model.blocks:
            if compile:
                block.compile()
            fully_shard(block, mp_policy=policy)
        if not model.config.tie_embeddings:  # own units: the embedding is needed first, the head last
            fully_shard(model.wte, mp_policy=policy)
            fully_shard(model.lm_head, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    model.to_empty(device=device)
    if model.config.tie_embeddings and not fsdp2:
        model.lm_head.weight = model.wte.weight  # materialising gave the two modules separate tensors
    torch.manual_seed(seed)  # the same initial weights on every rank
    model.init_weights()
    if checkpoint is not None:
        check_compatible(checkpoint, model)
        state = clean_state_dict(checkpoint["model"])
        if fsdp2:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        else:
            model.load_state_dict(state)
    torch.manual_seed(seed + rank)
    return model


def check_compatible(checkpoint, model):
    """A checkpoint's weights only load into the same architecture; context, dropout and kernel may change."""
    ours = asdict(model.config)
    theirs = checkpoint["model_args"]
    differ = {k: (theirs.get(k), v) for k, v in ours.items()
              if k not in ("block_size", "dropout", "attn_impl") and theirs.get(k) != v}
    if differ:
        sys.exit(f"the checkpoint's model differs from this config (checkpoint, config): {differ}; "
                 "set the same values (or start from scratch)")


# ------------------------------------------------------------------------------------------------------------ setup
rank, local_rank, world_size, device = setup_distributed()
ddp, master = world_size > 1, rank == 0
device_type = "cuda" if device.startswith("cuda") else "xla" if device.startswith("xla") else "cpu"
fsdp2, xla_fsdp = fsdp and device_type != "xla", fsdp and device_type == "xla"  # torch FSDP2, or XLA's FSDPv2
if fsdp2 and dtype == "float16":
    sys.exit("fsdp=True with dtype='float16' would train without loss scaling: use bfloat16 (or float32)")
if dtype == "auto":
    dtype = "bfloat16" if device_type == "xla" or (device_type == "cuda" and torch.cuda.is_bf16_supported()) else "float32"
compile = device_type == "cuda" if compile is None else compile and device_type != "xla"
ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
autocast = nullcontext() if device_type == "cpu" or fsdp2 else torch.autocast(device_type, dtype=ptdtype)
torch.manual_seed(seed + rank)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True

if dry_run:
    meta_model = build_meta_model(dataset_vocab_size())
    if master:
        print_dry_run(meta_model, meta_model.config)
        print(f"memory per GPU, world size {world_size}, batch_size {batch_size}, fsdp={fsdp}, "
              f"activation_checkpoint={activation_checkpoint!r}:")
        print(format_plan(memory_plan_for(meta_model), gpu_memory_gb()))
    finish()

if master:
    os.makedirs(out_dir, exist_ok=True)
data_dirs, mix_weights = dataset_dirs()
try:
    train_loader = BatchLoader(data_dirs, "train", batch_size, block_size, rank, world_size, seed, mix_weights)
    eval_loaders = {split: BatchLoader(data_dirs, split, batch_size, block_size, rank, world_size, seed + 7,
                                       mix_weights) for split in ("train", "val")}
except (OSError, ValueError) as e:  # missing or corrupt shards: the message names the file and the fix
    sys.exit(str(e))
eval_loaders = {split: (loader, loader.state_dict()) for split, loader in eval_loaders.items()}  # + where to rewind
tokenizer = Tokenizer.for_dataset(data_dirs[0])
if total_batch_size:  # the accumulation that comes closest to the requested tokens per step
    gradient_accumulation_steps = max(1, round(total_batch_size / (batch_size * block_size * world_size)))
tokens_per_iter = gradient_accumulation_steps * world_size * batch_size * block_size

resume_from = None
if init_from == "resume":
    resume_from = (step_dirs(out_dir) or [None])[-1] if fsdp2 else os.path.join(out_dir, "ckpt.pt")
    if resume_from is None:
        sys.exit(f"init_from='resume' but {out_dir} holds no complete sharded checkpoint (step_*/)")
weights = None
try:
    if init_from not in ("scratch", "resume"):  # weights only: a new phase with a fresh optimizer and data stream
        weights = load_checkpoint(init_from)
    elif resume_from and not fsdp2:
        weights = load_checkpoint(resume_from)
except (OSError, RuntimeError, ValueError) as e:  # the message says which file and what to do
    sys.exit(str(e))
model = build_model(tokenizer.vocab_size, weights)
if master:
    print(f"{model.num_params():,} parameters ({model.num_params(active=True):,} active), "
          f"{tokens_per_iter:,} tokens/iter, device {device} {dtype}, world {world_size}"
          f"{', fsdp' if fsdp else ''}, activation_checkpoint={activation_checkpoint!r}")
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16" and device_type == "cuda" and not fsdp2)
iter_num, best_val_loss = 0, float("inf")
if init_from == "resume":
    state = load_sharded(resume_from, model, optimizer) if fsdp2 else weights
    if not fsdp2:
        optimizer.load_state_dict(state["optimizer"])
    train_loader.load_state_dict(state["loader"])
    iter_num, best_val_loss = state["iter_num"], state["best_val_loss"]
    torch.set_rng_state(state["rng"]["torch"])
    if device_type == "cuda" and state["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"].cpu())
    if master:
        print(f"resumed from {resume_from} at iter {iter_num}")
elif master and os.path.exists(os.path.join(out_dir, "metrics.jsonl")):
    os.remove(os.path.join(out_dir, "metrics.jsonl"))  # a fresh run starts a fresh log
weights = state = None

raw_model = model
if xla_fsdp:
    model = wrap_fsdpv2(model)
    if master:
        import torch_xla
        specs = [torch_xla._XLAC._get_xla_sharding_spec(p) for p in model.parameters()]
        print(f"FSDPv2: {sum(1 for s in specs if 'devices=' in s)} of {len(specs)} parameter tensors sharded, "
              f"e.g. {next((s for s in specs if 'devices=' in s), 'none')}")
if compile and not fsdp2:  # under FSDP each block was compiled before sharding
    model = torch.compile(model)
if ddp and not fsdp2:
    # buffers stay per rank: MoE loads are summed explicitly after each step, and the biases stay equal by construction
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None, broadcast_buffers=False)
moe_layers = raw_model.moe_layers()
flops_per_iter = raw_model.flops_per_token(block_size) * tokens_per_iter
peak = device_peak_flops() * world_size


def save(val_loss):
    """ckpt.pt (temp file + rename) from rank 0, or under FSDP a sharded step folder written by every rank."""
    meta = {"model_args": asdict(raw_model.config), "config": config, "iter_num": iter_num,
            "best_val_loss": best_val_loss, "val_loss": val_loss, "loader": train_loader.state_dict(),
            "tokenizer": tokenizer.spec,
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None}}
    if fsdp2:
        save_sharded(out_dir, iter_num, model, optimizer, meta, keep=keep_checkpoints)
    elif master:
        save_checkpoint(to_cpu(dict(meta, model=raw_model.state_dict(), optimizer=optimizer.state_dict())),
                        os.path.join(out_dir, "ckpt.pt"))


# ------------------------------------------------------------------------------------------------------------- loop
t_start = t_log = time.time()
losses = {}
while True:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group["lr"] = lr

    if iter_num % eval_interval == 0 or iter_num == max_iters:
        losses = estimate_loss()
        if master:
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            log_metrics({"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                         "time": time.time() - t_start})
            plot_metrics(os.path.join(out_dir, "loss.png"), os.path.join(out_dir, "metrics.jsonl"))
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
        sync = micro_step == gradient_accumulation_steps - 1
        if fsdp2:
            model.set_requires_gradient_sync(sync)  # reduce-scatter gradients only on the last micro-step
        with (model.no_sync() if ddp and not fsdp2 and not sync else nullcontext()), autocast:
            _, loss = model(x, y)
            loss = loss / gradient_accumulation_steps
        scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    imbalance = None
    if moe_layers:  # aux-loss-free balancing: nudge each expert's selection bias against its load
        loads = torch.stack([m.load for m in moe_layers])
        if ddp:
            dist.all_reduce(loads)
        imbalance = (loads.max(1).values / loads.mean(1).clamp(min=1)).mean()  # read at log intervals only
        for m, load in zip(moe_layers, loads):
            m.load.copy_(load)
            m.update_bias()
    step_barrier()
    iter_num += 1

    if iter_num % log_interval == 0:
        loss_value = loss.detach() * gradient_accumulation_steps
        if ddp:  # the mean over ranks: the loss of the whole global micro-batch
            dist.all_reduce(loss_value, op=dist.ReduceOp.AVG)
        loss_value = loss_value.item()  # the only host sync in the step, at log intervals
        if not math.isfinite(loss_value):  # the same on every rank (all-reduced), so every rank stops here
            finish(f"loss is not finite ({loss_value}) at iter {iter_num}: stopping, the last good checkpoint is kept; "
                   "try a lower learning_rate or grad_clip")
    if iter_num % log_interval == 0 and master:
        dt = (time.time() - t_log) / log_interval
        t_log = time.time()
        mfu = f"{100 * flops_per_iter / dt / peak:.1f}%" if peak else "n/a"
        imbalance = imbalance.item() if imbalance is not None else None
        moe = f", expert load max/mean {imbalance:.2f}" if imbalance is not None else ""
        xla = f", {xla_compilations()} XLA compilations" if device_type == "xla" and iter_num <= 10 * log_interval else ""
        mixture = f", mixture {[round(f, 3) for f in train_loader.mixture()]}" if len(data_dirs) > 1 else ""
        print(f"iter {iter_num}: loss {loss_value:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter, "
              f"{tokens_per_iter / dt:,.0f} tok/s, mfu {mfu}{moe}{mixture}{xla}")
        log_metrics({"iter": iter_num, "loss": loss_value, "lr": lr, "ms_per_iter": dt * 1000,
                     "tokens_per_s": tokens_per_iter / dt, "mfu": flops_per_iter / dt / peak if peak else None,
                     "expert_imbalance": imbalance, "mixture": train_loader.mixture(),
                     "xla_compilations": xla_compilations() if device_type == "xla" else None})

if master and losses:
    print(f"final val loss {losses['val']:.4f} at iter {iter_num} ({time.time() - t_start:.1f} s)")
finish()
