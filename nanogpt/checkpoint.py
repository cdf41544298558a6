"""Checkpoints: written to a temp file and renamed (a crash never leaves a half-written file as the latest), read
without running code (torch.load with weights_only=True: tensors and plain containers only), and loaded with
errors that say what went wrong. `load_model` is what sample.py, chat.py and the evaluations use.

Names follow one rule across the library: `read_*` returns plain data read from files (a checkpoint dict,
tensors, rows), `load_*` returns live objects or fills them (a model, a scorer, an optimizer's state), and
`X_from_Y` builds one thing from another in memory."""
import errno
import hashlib
import os
import pickle
import re
import shutil
import sys
from dataclasses import asdict

import torch

from model import GPT, GPTConfig, layer_plan
from nanogpt import lora
from nanogpt.files import atomic_path
from nanogpt.posttrain import adapt_checkpoint
from nanogpt.tokenizer import GPT2_VOCAB_SIZE, VOCAB_MULTIPLE, Tokenizer

# model_args keys that older checkpoints saved but that are not part of the architecture (the attention kernel is
# chosen by the process that runs the model): ignored when reading
NOT_ARCHITECTURE = ("attn_impl",)
# "Same architecture" (resuming, a new phase, merging): every GPTConfig field is architecture, defaults resolved,
# except these training-only ones, which change neither the weights' shapes nor the function they compute: context
# length, dropout, the MoE balancing strengths and the initialisation. A run takes them from its settings.
TRAINING_ONLY = ("block_size", "dropout", "moe_bias_gamma", "moe_aux_alpha", "zero_init_proj")


def to_cpu(obj):
    """A state with every tensor on the CPU (XLA tensors must leave the device before torch.save)."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


class CheckpointWriteError(OSError):
    pass


def write_error(path, error):
    """A CheckpointWriteError saying why `path` could not be written (a full disk is named as such: torch reports it
    as 'unexpected pos ...') and whether a previous checkpoint is kept; called while the temp file still exists."""
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free  # the temp file still holds its space
    full = getattr(error, "errno", None) == errno.ENOSPC or free < 2**20
    reason = f"no space left on the disk ({free / 2**20:.1f} MiB free)" if full else str(error)
    kept = "the previous checkpoint is kept" if os.path.exists(path) else "no checkpoint was written"
    return CheckpointWriteError(f"could not write {path}: {reason}; {kept}")


def save_checkpoint(state, path):
    """torch.save through a temp file renamed over path (nanogpt/files.py). On failure the temp file goes and the
    previous checkpoint stays."""
    with atomic_path(path) as tmp:
        try:
            torch.save(state, tmp)
        except (OSError, RuntimeError) as e:
            raise write_error(path, e) from e


def read_state(path, map_location="cpu"):
    """torch.load of a file this repo wrote: tensors and plain containers only, so a crafted file cannot run code."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"unsupported GLOBAL (\S+)", str(e))
        what = f"it names {found.group(1)}" if found else "it holds more than tensors and plain data"
        raise RuntimeError(f"{path} is not a readable checkpoint of this repo ({what}); nothing in it was run") from e
    except Exception as e:  # a zero-byte or cut file says nothing: name what it is
        reason = str(e).splitlines()[0] if str(e) else f"{os.path.getsize(path)} bytes, {type(e).__name__}"
        raise RuntimeError(f"{path} is not a readable checkpoint of this repo ({reason}); "
                           "nothing in it was run") from e


def read_checkpoint_file(path, map_location="cpu", quantized_ok=False):
    if not os.path.exists(path):
        out_dir = (os.path.dirname(path) or ".") if path.endswith(".pt") else path  # else: a run not trained yet
        raise FileNotFoundError(f"no checkpoint at {path}: train one first, e.g. `python train.py --out_dir={out_dir}`")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder: give the ckpt.pt inside it (or a sharded run's out_dir to "
                                "sample.py / eval scripts)")
    ckpt = read_state(path, map_location)
    missing = {"model", "model_args"} - set(ckpt) if isinstance(ckpt, dict) else {"model", "model_args"}
    if missing:
        raise ValueError(f"{path} lacks {sorted(missing)}: not a checkpoint of this repo's train.py")
    if ckpt.get("quantization") and not quantized_ok:  # tools/quantize.py wrote it: weights for inference only
        raise ValueError(f"{path} holds {ckpt['quantization']['scheme']} weights quantized for inference: train, "
                         "merge or export the float checkpoint it was quantized from")
    return ckpt


def clean_state_dict(state):
    """Strip the wrappers' prefixes (torch.compile's _orig_mod., DDP's module.) from parameter names."""
    return {k.replace("_orig_mod.", "").removeprefix("module."): v for k, v in state.items()}


def architecture(ckpt):
    """The GPTConfig fields a checkpoint saved, without the runtime settings older versions kept there."""
    return {k: v for k, v in ckpt["model_args"].items() if k not in NOT_ARCHITECTURE}


def architecture_fields(cfg):
    """A GPTConfig's architecture as a dict, defaults resolved (widths left at 0 and their computed values compare
    equal, and 'LG' on 4 layers is 'LGLG'); the TRAINING_ONLY fields left out."""
    args = dict(asdict(cfg), mlp_hidden=cfg.hidden, moe_hidden=cfg.expert_hidden if cfg.n_expert else 0,
                attn_pattern="".join(kind for kind, _, _ in layer_plan(cfg)),
                local_window=cfg.local_window if "L" in cfg.attn_pattern else None)
    return {k: v for k, v in args.items() if k not in TRAINING_ONLY}


def architecture_differences(a, b):
    """{field: (a's value, b's value)} for each architecture field where GPTConfigs a and b differ."""
    mine, theirs = architecture_fields(a), architecture_fields(b)
    return {k: (v, theirs[k]) for k, v in mine.items() if theirs[k] != v}


def architecture_for(settings, explicit, ckpt=None):
    """GPTConfig's fields for a run: its settings, or when it starts from a checkpoint the checkpoint's architecture
    (the TRAINING_ONLY fields stay the settings'). A setting given explicitly (`explicit`: names) that contradicts
    the checkpoint is an error, never silently dropped."""
    if ckpt is None:
        return settings
    theirs = {k: v for k, v in asdict(GPTConfig(**architecture(ckpt))).items() if k not in TRAINING_ONLY}
    clash = {k: (theirs[k], settings[k]) for k in explicit & theirs.keys() & settings.keys()
             if theirs[k] != settings[k]}
    if clash:
        raise ValueError(f"the checkpoint's model differs from these settings (checkpoint, setting): {clash}; drop "
                         "the settings (the checkpoint's architecture is used) or start from scratch")
    return dict(settings, **theirs)


def check_compatible(ckpt, cfg):
    """A ValueError unless a checkpoint's weights fit the model of `cfg` (architecture_differences is empty)."""
    differ = architecture_differences(GPTConfig(**architecture(ckpt)), cfg)
    if differ:
        raise ValueError(f"the checkpoint's model differs from this config (checkpoint, config): {differ}; "
                         "set the same values (or start from scratch)")


def model_from_checkpoint(ckpt, path="checkpoint", attn_impl="sdpa"):
    """Build the GPT a checkpoint describes and load its weights, with a clear error for a mismatched model."""
    try:
        model = GPT(GPTConfig(**architecture(ckpt)), attn_impl=attn_impl)
    except TypeError as e:
        raise ValueError(f"{path}: its model_args do not fit this model.py ({e}); it comes from another model "
                         "version") from e
    if ckpt.get("quantization"):  # tools/quantize.py wrote it: quantized layers to load the codes into
        from nanogpt.quant import quantize_model
        q = ckpt["quantization"]
        quantize_model(model, q["scheme"], q["group_size"], q["head"], empty=True)
    result = model.load_state_dict(clean_state_dict(ckpt["model"]), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path}: weights do not match the model it describes "
                         f"(missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})")
    return model


def read_checkpoint(source, quantized_ok=False):
    """The checkpoint dict of a run folder (its ckpt.pt, else its newest sharded step_N/), a step_N/ folder, a
    ckpt.pt path, or hf:FOLDER (a Hugging Face model, converted by nanogpt/hf.py): every place that takes a model takes
    these. A LoRA run's checkpoint comes with its adapters merged into its base model's weights. A quantized
    checkpoint (tools/quantize.py) is refused unless quantized_ok: only inference loads it."""
    if source.startswith("hf:"):
        from nanogpt import hf
        return hf.read_hf_checkpoint(source[3:])
    if os.path.isdir(source) and os.path.exists(os.path.join(source, "meta.pt")):
        return consolidate(source)
    if os.path.isdir(source):
        sharded = step_dirs(source)
        if not os.path.exists(os.path.join(source, "ckpt.pt")) and sharded:
            return consolidate(sharded[-1])
        source = os.path.join(source, "ckpt.pt")
    ckpt = read_checkpoint_file(source, quantized_ok=quantized_ok)
    if "lora" in ckpt:  # a LoRA run's adapters: merged into its base's weights (nanogpt/lora.py)
        return merged_lora_checkpoint(ckpt, source)
    return ckpt


def results_dir(source):
    """The folder an evaluation of `source` writes its results into: the run folder, the folder of a ckpt.pt or a
    step_N/ folder's run, or an hf: folder."""
    path = source[3:] if source.startswith("hf:") else source
    if os.path.isfile(path) or (os.path.isdir(path) and os.path.exists(os.path.join(path, "meta.pt"))):
        return os.path.dirname(os.path.abspath(path))
    return path


def load_model(out_dir, device="cpu", attn_impl="sdpa"):
    """(model in eval mode on `device` with the given attention kernel, its Tokenizer, the raw checkpoint dict) from
    any source read_checkpoint takes: a run folder, a step_N/ folder, a ckpt.pt, or hf:FOLDER."""
    ckpt = read_checkpoint(out_dir, quantized_ok=True)
    model = model_from_checkpoint(ckpt, out_dir, attn_impl).to(device).eval()
    for moe in model.moe_layers():  # XLA compiles static shapes: every expert on every token
        moe.dense_dispatch = str(device).startswith("xla")
    return model, Tokenizer(tokenizer_spec(ckpt, out_dir)), ckpt


def tokenizer_spec(ckpt, source):
    """The checkpoint's tokenizer. One that names none (written by older code or other tools) is taken as GPT-2 BPE
    only when its vocabulary has GPT-2's size, and the reader is told; any other is refused, never decoded wrongly."""
    if "tokenizer" in ckpt:
        return ckpt["tokenizer"]
    vocab = ckpt["model_args"].get("vocab_size")
    if vocab not in (GPT2_VOCAB_SIZE, -(-GPT2_VOCAB_SIZE // VOCAB_MULTIPLE) * VOCAB_MULTIPLE):  # or padded
        raise ValueError(f"{source}: the checkpoint names no tokenizer and its {vocab}-token vocabulary is not "
                         "GPT-2's: add its tokenizer spec (the dataset's tokenizer.json) as ckpt['tokenizer']")
    print(f"{source}: the checkpoint names no tokenizer; its {vocab}-token vocabulary is GPT-2's, so GPT-2 BPE is used",
          file=sys.stderr)
    return {"kind": "gpt2"}


# ------------------------------------------------- sharded checkpoints (FSDP): torch.distributed.checkpoint folders

def has_checkpoint(out_dir):
    return os.path.exists(os.path.join(out_dir, "ckpt.pt")) or bool(step_dirs(out_dir))


def remove_stale_writes(out_dir):
    """Delete what killed writers left in out_dir: ckpt.pt.tmp<PID> files whose process is gone, and unfinished
    sharded step_N.tmp folders (run before this run writes anything). Returns the removed names."""
    removed = []
    for name in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []:
        path = os.path.join(out_dir, name)
        temp_file = re.fullmatch(r".+\.tmp(\d+)", name)
        if temp_file and os.path.isfile(path) and not process_alive(int(temp_file.group(1))):
            os.remove(path)
        elif re.fullmatch(r"step_\d+\.tmp", name) and os.path.isdir(path):
            shutil.rmtree(path)
        else:
            continue
        removed.append(name)
    return removed


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def step_dirs(out_dir):
    """Complete sharded checkpoints, oldest first: out_dir/step_NNNNNN (a .tmp folder is an unfinished write)."""
    if not os.path.isdir(out_dir):
        return []
    names = sorted((n for n in os.listdir(out_dir) if n.startswith("step_") and n[5:].isdigit()),
                   key=lambda n: int(n[5:]))
    return [os.path.join(out_dir, n) for n in names if os.path.exists(os.path.join(out_dir, n, "meta.pt"))]


def save_sharded(out_dir, step, model, optimizer, meta, keep=2):
    """Every rank writes its shards into step_N.tmp; rank 0 adds meta.pt and renames the folder when all are done."""
    import shutil

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = os.path.join(out_dir, f"step_{step:06d}")
    tmp = final + ".tmp"
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
    dist.barrier()
    if dist.get_rank() == 0:
        torch.save(meta, os.path.join(tmp, "meta.pt"))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in step_dirs(out_dir)[:-keep]:
            shutil.rmtree(old)
    dist.barrier()


def save_run(out_dir, meta, model, raw_model, optimizer, mode, master, keep=2):
    """A training run's checkpoint: ckpt.pt from rank 0 (meta plus weights and optimizer state, on the CPU), or
    under FSDP a sharded step folder written by every rank. A failed write stops the run with its one-line reason
    (under torchrun the launcher then stops the other ranks); the previous checkpoint is kept."""
    if mode == "fsdp":
        save_sharded(out_dir, meta["iter_num"], model, optimizer, meta, keep=keep)
    elif master:
        try:
            weights = raw_model.state_dict()
            if getattr(raw_model, "lora", None):  # a LoRA run saves its adapters only (nanogpt/lora.py)
                weights = lora.adapter_state(raw_model)
            save_checkpoint(to_cpu(dict(meta, model=weights, optimizer=optimizer.state_dict())),
                            os.path.join(out_dir, "ckpt.pt"))
        except OSError as e:
            sys.exit(str(e))


def load_sharded(path, model, optimizer):
    """Load a sharded checkpoint into an FSDP model and optimizer (any world size); return its meta dict."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return read_state(os.path.join(path, "meta.pt"))


def consolidate(path):
    """A sharded checkpoint folder as one ckpt.pt-style dict (model weights + meta), in a single process."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path, os.path.join(tmp, "full.pt"))
        full = read_state(os.path.join(tmp, "full.pt"))
    meta = read_state(os.path.join(path, "meta.pt"))
    return dict(meta, model=full["model"])


def consolidate_newest(out_dir):
    """Write out_dir/ckpt.pt from the newest sharded checkpoint (for sample.py, eval_mmlu.py or sharing)."""
    dirs = step_dirs(out_dir)
    if not dirs:
        raise FileNotFoundError(f"no sharded checkpoint (step_*/) in {out_dir}")
    save_checkpoint(consolidate(dirs[-1]), os.path.join(out_dir, "ckpt.pt"))
    return dirs[-1]


# ---------------------------------------------------------------------------------- weights and LoRA runs

def weights_fingerprint(state):
    """sha256 over a state dict's names, dtypes, shapes and bytes: the identity of a set of weights."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_lora_base(ckpt, source="checkpoint"):
    """The checkpoint dict of the base model an adapter checkpoint points to, adapted to the tokenizer the adapters
    were trained with (new chat-token rows, as the run started), its fingerprint checked."""
    path = ckpt["lora_base"]
    try:
        base = read_checkpoint(path)
    except (OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{source} holds LoRA adapters of the base model {path}, which cannot be read ({e}): put "
                         "the base back there") from None
    base, _ = adapt_checkpoint(base, ckpt["tokenizer"], ckpt["model_args"]["vocab_size"])
    if weights_fingerprint(clean_state_dict(base["model"])) != ckpt["lora_base_fingerprint"]:
        raise ValueError(f"{source} holds LoRA adapters of {path}, but the weights there are not the ones they were "
                         "trained on (their sha256 differs): restore that base model")
    return base


def merged_lora_checkpoint(ckpt, source="checkpoint"):
    """An adapter checkpoint as an ordinary one: the base's weights with the adapters folded in, the run's other
    records kept (not its optimizer, data position or RNG: a merged model starts new phases, it does not resume)."""
    model = model_from_checkpoint(read_lora_base(ckpt, source), ckpt["lora_base"])
    spec = ckpt["lora"]
    lora.attach(model, spec["rank"], spec["alpha"], 0.0, spec["targets"], spec["experts"])
    lora.load_adapter_state(model, ckpt["model"])
    dropped = ("optimizer", "loader", "rng", "lora", "lora_base", "lora_base_fingerprint")
    return dict({k: v for k, v in ckpt.items() if k not in dropped}, model=lora.merge(model).state_dict(),
                merged_from={"adapters": source, "base": ckpt["lora_base"]})
