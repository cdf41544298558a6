"""Where a model runs: the device, the compute dtype and its autocast context, the attention kernel, and the
device's peak FLOPs. train.py, sample.py, eval_mmlu.py and the benchmarks resolve these here, one way."""
import re
from contextlib import nullcontext

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_SETTINGS = ("auto", *DTYPES)
ATTN_IMPLS = ("auto", "triton", "sdpa")
# Dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets; MFU divides by these.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12,
                   "A100": 312e12, "A10G": 125e12, "L4": 121e12, "4090": 165e12}


def resolve_device(name):
    """A concrete device for a `device` setting: 'auto' (cuda when there is a GPU, else cpu), 'cpu', 'cuda',
    'cuda:N' or 'xla' (torch_xla is imported on that path only)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "xla":
        import torch_xla
        return str(torch_xla.device())
    if name.startswith("xla:"):
        return name
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'xla', got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but this machine has no CUDA GPU: use device='cpu' (or 'auto')")
    return name


def device_type(device):
    """'cuda', 'xla' or 'cpu' for a device string."""
    return "cuda" if device.startswith("cuda") else "xla" if device.startswith("xla") else "cpu"


def resolve_dtype(name, dev_type):
    """(name, torch dtype) for a `dtype` setting; 'auto' is bfloat16 on XLA and on CUDA GPUs that have it, else
    float32."""
    if name == "auto":
        bf16 = dev_type == "xla" or (dev_type == "cuda" and torch.cuda.is_bf16_supported())
        name = "bfloat16" if bf16 else "float32"
    if name not in DTYPES:
        raise ValueError(f"dtype must be 'auto', {', '.join(map(repr, DTYPES))}, got {name!r}")
    return name, DTYPES[name]


def autocast_for(dev_type, dtype):
    """The forward's mixed-precision context: autocast to `dtype` (weights stay fp32), or nothing for float32."""
    return nullcontext() if dtype == torch.float32 else torch.autocast(dev_type, dtype=dtype)


def resolve_attn_impl(name):
    """The attention kernel for an `attn_impl` setting. 'auto' is PyTorch's SDPA everywhere for now: on the first
    GPU run (one H200, bench/RESULTS.md "GPU check 1") the Triton kernel's gradients were wrong at T = 8k and cuDNN's
    SDPA was faster in both directions, so 'triton' is opt-in until `bench/gpu_check.sh` passes. A choice of the
    process that runs the model, never saved with it."""
    if name not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {', '.join(map(repr, ATTN_IMPLS))}, got {name!r}")
    return "sdpa" if name == "auto" else name


def peak_flops(device):
    """Dense bf16 peak FLOP/s of a CUDA device (for MFU); 0.0 when unknown or not a GPU."""
    if device_type(str(device)) != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), 0.0)


def load_for_inference(out_dir, device, dtype, attn_impl):
    """(model in eval mode, tokenizer, checkpoint dict, device, compute dtype, autocast context) for the settings of
    a script that samples or evaluates; a bad setting or an unreadable checkpoint ends it with one line."""
    from nanogpt.checkpoint import (
        load_model,  # (nanogpt/checkpoint.py does not need this module; importing it here keeps it so)
    )
    try:
        device = resolve_device(device)
        _, ptdtype = resolve_dtype(dtype, device_type(device))
        kernel = resolve_attn_impl(attn_impl)
    except ValueError as e:
        raise SystemExit(f"config error: {e}")
    try:
        model, tokenizer, ckpt = load_model(out_dir, device, kernel)
    except (OSError, ValueError, RuntimeError) as e:
        raise SystemExit(str(e))
    return model, tokenizer, ckpt, device, ptdtype, autocast_for(device_type(device), ptdtype)
