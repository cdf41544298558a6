"""How a run starts, and the model it starts with. Three kinds of start:

    scratch    fresh weights (init_from='scratch'); out_dir must not hold a trained checkpoint unless overwrite
    resume     this run's own checkpoint: out_dir/ckpt.pt, or under FSDP its newest step_N/ folder (weights and
               optimizer in shards, everything else in its meta.pt); optimizer, loader, RNG and counters continue
    new phase  another run's weights (a run folder, ckpt.pt or hf:FOLDER), adapted to the data's tokenizer, with a
               fresh optimizer and data stream; a DPO run's frozen reference model is this starting point

Errors are ValueError / OSError / RuntimeError with a message that says what to do; train.py prints it and stops.
"""
import fcntl
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, fields

import torch

from model import GPT, GPTConfig
from nanogpt import lora, metrics
from nanogpt.checkpoint import (
    architecture_for,
    check_compatible,
    clean_state_dict,
    has_checkpoint,
    read_checkpoint_file,
    read_checkpoint,
    read_state,
    remove_stale_writes,
    step_dirs,
    weights_fingerprint,
)
from nanogpt.loader import BatchLoader, PrefixLoader
from nanogpt.memory import advice, fits, format_plan, plan_for
from nanogpt.optim import load_optimizer_state
from nanogpt.parallel import barrier, shard_fsdp2
from nanogpt.posttrain import adapt_checkpoint
from nanogpt.tokenizer import CHAT_TOKENS, Tokenizer, dataset_tokenizer, model_vocab_size

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUTO_PREPARED = ("shakespeare_char", "shakespeare")  # small enough to prepare unasked; others print their command


@dataclass
class Placement:
    """Where and how this process runs (from the device settings and torchrun)."""
    rank: int
    local_rank: int
    world_size: int
    device: str
    mode: str            # 'single', 'ddp', 'fsdp' or 'xla_spmd' (nanogpt/parallel.py)
    device_type: str
    dtype: str           # 'float32', 'bfloat16' or 'float16'
    ptdtype: torch.dtype
    compile: bool
    attn_kernel: str

    @property
    def master(self):
        return self.rank == 0


LOCK_FILE = ".train.lock"
DPO_SETTINGS = ("dpo_beta", "dpo_label_smoothing", "dpo_ipo")  # read by the DPO objective only


def lock_out_dir(out_dir):
    """An exclusive lock on out_dir for as long as the returned file stays open. The OS drops a flock when its
    process ends, however it ends, so a crashed run never leaves the folder locked."""
    handle = open(os.path.join(out_dir, LOCK_FILE), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise ValueError(f"{out_dir} is in use by another train.py (pid {holder}): wait for it to end, or train "
                         "into another --out_dir") from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def prepare_out_dir(out_dir, init_from, overwrite, master):
    """Refuse to replace a trained checkpoint by accident; create and lock out_dir (rank 0 holds the lock: the
    returned handle) and clear what killed writers left."""
    if init_from != "resume" and has_checkpoint(out_dir) and not overwrite:
        raise ValueError(f"{out_dir} already holds a trained checkpoint: continue it with --init_from=resume, train "
                         "into another --out_dir, or pass --overwrite=True to replace it")
    if not master:
        return None
    os.makedirs(out_dir, exist_ok=True)
    lock = lock_out_dir(out_dir)
    stale = remove_stale_writes(out_dir)
    if stale:
        print(f"removed unfinished checkpoint writes of killed runs in {out_dir}: {', '.join(stale)}")
    return lock


def remove_if_unused(out_dir):
    """Remove a folder this run created when it holds nothing but the run's lock (a run refused before writing)."""
    if os.path.isdir(out_dir) and set(os.listdir(out_dir)) <= {LOCK_FILE}:
        shutil.rmtree(out_dir)


def dataset_dirs(data_root, mix, master):
    """(folders, weights) of a dataset mixture {name: weight}; prepares the tiny-Shakespeare sets when missing.
    A ValueError when preparing fails."""
    dirs = [os.path.join(data_root, name) for name in mix]
    for name, d in zip(mix, dirs):
        missing = not any(f.startswith("train_") for f in os.listdir(d)) if os.path.isdir(d) else True
        if missing and master and name in AUTO_PREPARED:
            script = os.path.join(REPO, "data", name, "prepare.py")
            print(f"no shards in {d}: running {script}")
            if subprocess.run([sys.executable, script, "--out_dir", d]).returncode != 0:
                raise ValueError(f"could not prepare {name} (the reason is above)")
    barrier()
    return dirs, list(mix.values())


def make_loaders(config, data_dirs, mix_weights, place):
    """(training loader, {split: evaluation loader}, the data's tokenizer). The evaluation loaders have their own
    seed; with val_tokens the val split is exactly its first val_tokens tokens, in order."""
    rank, world, batch, block = place.rank, place.world_size, config["batch_size"], config["block_size"]
    train_loader = BatchLoader(data_dirs, "train", batch, block, rank, world, config["seed"], mix_weights)
    eval_loaders = {split: BatchLoader(data_dirs, split, batch, block, rank, world, config["seed"] + 7, mix_weights)
                    for split in ("train", "val")}
    if config["val_tokens"]:
        eval_loaders["val"] = PrefixLoader(data_dirs[0], "val", config["val_tokens"], batch, block, rank, world)
    return train_loader, eval_loaders, dataset_tokenizer(data_dirs)


def resume_path(out_dir, mode):
    """The checkpoint a resumed run continues: out_dir/ckpt.pt, or under FSDP the newest complete step_N/."""
    if mode != "fsdp":
        return os.path.join(out_dir, "ckpt.pt")
    steps = step_dirs(out_dir)
    if not steps:
        raise ValueError(f"init_from='resume' but {out_dir} holds no complete sharded checkpoint (step_*/)")
    return steps[-1]


def read_phase_start(path, tokenizer, master, need_chat=False):
    """A checkpoint to start a new phase from (weights only), adapted to the data's tokenizer: rows for special
    tokens new to it (chat fine-tuning of a base model) start at the mean embedding, and the run says so.
    need_chat (RL): a checkpoint that never learned the chat tokens (a base model) is refused."""
    checkpoint = read_checkpoint(path)
    if need_chat and not set(CHAT_TOKENS) <= checkpoint.get("tokenizer", {}).get("special", {}).keys():
        raise ValueError(f"{path} was trained without the chat tokens (a base model): RL samples chat replies, so "
                         "fine-tune it first (SFT, e.g. config/sft_arith.py) and start RL from that run")
    checkpoint, note = adapt_checkpoint(checkpoint, tokenizer.spec, model_vocab_size(tokenizer))
    if note and master:
        print(f"{path}: {note}")
    return checkpoint


def read_start(init_from, resume_from, mode, tokenizer, master, objective):
    """The checkpoint dict the run starts from, or None for scratch. A sharded run's meta.pt holds all but the
    weights and optimizer (they load after the model is sharded: load_sharded). A resume keeps its objective
    ('next_token', 'dpo' or 'rl'): other data would turn the run into another one."""
    if init_from not in ("scratch", "resume"):
        return read_phase_start(init_from, tokenizer, master, need_chat=objective == "rl")
    if init_from == "scratch":
        return None
    if mode == "fsdp":
        checkpoint = read_state(os.path.join(resume_from, "meta.pt"))
    else:
        checkpoint = read_checkpoint_file(resume_from)
    if checkpoint.get("objective", objective) != objective:
        out_dir = os.path.dirname(resume_from)  # resume_from: out_dir/ckpt.pt or out_dir/step_N
        raise ValueError(f"{out_dir} is a {checkpoint['objective']} run and this data trains {objective}: start "
                         f"the new phase from it with --init_from={out_dir} and another --out_dir")
    if checkpoint.get("tokenizer", tokenizer.spec) != tokenizer.spec:
        raise ValueError(f"the checkpoint was trained with the {Tokenizer(checkpoint['tokenizer']).describe()} "
                         f"tokenizer but the data is {tokenizer.describe()}: use the data it was trained on")
    return checkpoint


def build_meta_model(config, explicit, vocab_size, place, checkpoint=None):
    """The model on the meta device (shapes only, no memory), with fp8 and activation checkpointing applied.
    config: the run's settings; explicit: the names given on the command line or in config files."""
    settings = {f.name: config[f.name] for f in fields(GPTConfig) if f.name in config}
    args = dict(architecture_for(settings, explicit, checkpoint), vocab_size=vocab_size,
                block_size=config["block_size"])
    with torch.device("meta"):
        model = GPT(GPTConfig(**args), attn_impl=place.attn_kernel)
    if config["fp8"]:
        if place.device_type == "xla":
            raise ValueError("fp8 is not supported on XLA (its kernels are Triton): set fp8=False")
        skipped = model.convert_fp8(config["fp8_recipe"])
        if skipped and place.master:
            print(f"fp8: kept in higher precision for their dims (not multiples of 16): {', '.join(skipped)}")
    for i, block in enumerate(model.blocks):
        selected = config["activation_checkpoint"] == "selective" and i % config["ac_every"] == 0
        block.checkpoint = config["activation_checkpoint"] == "full" or selected
    return model


def build_model(config, explicit, vocab_size, place, checkpoint=None):
    """Build on the meta device (the architecture of `checkpoint` when given), check the memory plan, shard with
    FSDP2 if asked, then materialise and initialise on the device (each rank only its shard), and load the
    checkpoint's weights if it has them."""
    model = build_meta_model(config, explicit, vocab_size, place, checkpoint)
    plan, gpu = plan_for(model, config, place.world_size, place.device, place.device_type, place.dtype)
    if gpu and not fits(plan, gpu):
        print(format_plan(plan, gpu))
        raise ValueError("this run does not fit in GPU memory; change one of:\n  - " + "\n  - ".join(
            advice(plan, gpu, config["fsdp"], place.world_size, config["activation_checkpoint"])))
    if place.mode == "fsdp":
        shard_fsdp2(model, place.ptdtype, place.compile)
    model.to_empty(device=place.device)
    if model.config.tie_embeddings and place.mode != "fsdp":
        model.lm_head.weight = model.wte.weight  # materialising gave the two modules separate tensors
    torch.manual_seed(config["seed"])  # the same initial weights on every rank
    model.init_weights()
    if checkpoint is not None and "model" in checkpoint:  # (a sharded run's weights load later, with its optimizer)
        check_compatible(checkpoint, model.config)
        state = clean_state_dict(checkpoint["model"])
        if place.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        else:
            model.load_state_dict(state)
    torch.manual_seed(config["seed"] + place.rank)
    return model


def reference_model(config, explicit, vocab_size, place, tokenizer, reference_from, resumed=None):
    """DPO's frozen model: the phase's starting point (for a resumed run, the one its checkpoint names), with its
    weights' fingerprint. A resumed run whose reference was replaced since it started is refused."""
    new_phase = reference_from not in ("scratch", "resume")
    start = read_phase_start(reference_from, tokenizer, place.master) if new_phase else None
    fingerprint = weights_fingerprint(clean_state_dict(start["model"])) if start else None
    recorded = (resumed or {}).get("reference_fingerprint")
    if recorded and fingerprint != recorded:
        raise ValueError(f"the DPO reference {reference_from} is not the one this run started from (its weights "
                         "changed): restore it, or start a new phase into another --out_dir")
    model = build_model(config, explicit, vocab_size, place, start).eval().requires_grad_(False)
    model.identity = {"reference_from": reference_from, "reference_fingerprint": fingerprint}  # saved with the run
    return model


@dataclass
class Progress:
    """The counters a run carries from checkpoint to checkpoint."""
    iter_num: int = 0
    best_val_loss: float = float("inf")
    train_seconds: float = 0.0
    joules_before: float = 0.0  # energy of earlier phases of a resumed run


def resume(state, resume_from, opt, train_loader, place, out_dir):
    """Continue a run from its checkpoint state (under FSDP the optimizer already came with the shards): the
    optimizer, the training loader's position, the RNG, the counters. Returns its Progress."""
    needed = {"loader", "iter_num", "best_val_loss", "rng"} | ({"optimizer"} if place.mode != "fsdp" else set())
    missing = sorted(needed - set(state))
    if missing:
        raise ValueError(f"{resume_from} holds no training state to resume ({', '.join(missing)} missing): start a "
                         f"new phase from its weights with --init_from={resume_from} (and another out_dir)")
    try:
        if place.mode != "fsdp":
            load_optimizer_state(opt, state["optimizer"])
        train_loader.load_state_dict(state["loader"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{resume_from}: cannot resume from it ({e})") from None
    torch.set_rng_state(state["rng"]["torch"])
    if place.device_type == "cuda" and state["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"].cpu())
    if place.master:
        print(f"resumed from {resume_from} at iter {state['iter_num']}")
        metrics.keep_until(out_dir, state["iter_num"])  # drop what the interrupted run logged after its checkpoint
    return Progress(state["iter_num"], state["best_val_loss"], state.get("train_seconds", 0.0),
                    state.get("energy_joules", 0.0))


def freeze_all_but(model, pattern):
    """Freeze every parameter whose name does not fully match the regular expression `pattern`; the names left
    training. A bad pattern, or one that matches nothing (the run would train nothing), is refused."""
    try:
        rule = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"train_only={pattern!r} is not a regular expression ({e})") from None
    names = [n for n, _ in model.named_parameters() if rule.fullmatch(n)]
    if not names:
        examples = ", ".join(n for n, _ in list(model.named_parameters())[:4])
        raise ValueError(f"train_only={pattern!r} matches no parameter name (they look like {examples}, ...)")
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    return names


def start_adapters(model, config, init_from, base, resumed=None):
    """Attach the run's adapters to `model` (holding the base weights `base`, a checkpoint dict): fresh ones for a
    new phase from init_from, or a resumed run's own (its spec must be this run's). Returns (names adapted, the
    records saved with every checkpoint: spec, base path and fingerprint)."""
    spec = lora.spec_of(config)
    if resumed is not None:
        saved = {k: resumed["lora"][k] for k in lora.SPEC_KEYS}
        if saved != spec:
            differ = {k: (saved[k], spec[k]) for k in lora.SPEC_KEYS if saved[k] != spec[k]}
            raise ValueError(f"config error: the run being resumed trains other LoRA adapters (checkpoint, setting): "
                             f"{differ}; set its values")
        identity = {"lora_base": resumed["lora_base"], "lora_base_fingerprint": resumed["lora_base_fingerprint"]}
    else:
        identity = {"lora_base": lora.source_path(init_from),
                    "lora_base_fingerprint": weights_fingerprint(clean_state_dict(base["model"]))}
    names = lora.attach(model, spec["rank"], spec["alpha"], config["lora_dropout"], spec["targets"], spec["experts"],
                   seed=config["seed"])
    if resumed is not None:
        lora.load_adapter_state(model, resumed["model"])
    return names, dict(identity, lora=dict(spec, dropout=config["lora_dropout"]))
