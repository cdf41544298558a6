"""Checkpoints: written to a temp file and renamed (a crash never leaves a half-written file as the latest), and
loaded with errors that say what went wrong. `load_model` is what sample.py and eval_mmlu.py use."""
import os

import torch

from model import GPT, GPTConfig
from tokenizer import Tokenizer


def save_checkpoint(state, path):
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never a mix
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, map_location="cpu"):
    if not os.path.exists(path):
        out_dir = os.path.dirname(path) or "."
        raise FileNotFoundError(f"no checkpoint at {path}: train one first, e.g. `python train.py --out_dir={out_dir}`")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise RuntimeError(f"{path} is not a readable checkpoint ({e}); was it written by this repo's train.py?") from e
    missing = {"model", "model_args"} - set(ckpt) if isinstance(ckpt, dict) else {"model", "model_args"}
    if missing:
        raise ValueError(f"{path} lacks {sorted(missing)}: not a checkpoint of this repo's train.py")
    return ckpt


def model_from_checkpoint(ckpt, path="checkpoint"):
    """Build the GPT a checkpoint describes and load its weights, with a clear error for a mismatched model."""
    try:
        model = GPT(GPTConfig(**ckpt["model_args"]))
    except TypeError as e:
        raise ValueError(f"{path}: its model_args do not fit this model.py ({e}); it comes from another model version") from e
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path}: weights do not match the model it describes "
                         f"(missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})")
    return model


def load_model(out_dir, device="cpu"):
    """(model in eval mode on `device`, its Tokenizer, the raw checkpoint dict) from out_dir/ckpt.pt."""
    path = os.path.join(out_dir, "ckpt.pt")
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path).to(device).eval()
    return model, Tokenizer(ckpt.get("tokenizer", {"kind": "gpt2"})), ckpt
