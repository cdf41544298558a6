"""Weight-only quantization for inference: int8 per output channel and int4 group-wise, for every linear layer of the
blocks (attention and MLP projections), the MoE experts' stacked weights, and optionally the output head.
tools/quantize.py turns a checkpoint into a quantized one; nanogpt/checkpoint.py loads it (sample, chat, eval, the
server).

Schemes (the codes' layout: nanokernels/quant_gemm.py):
    int8   symmetric, one fp32 scale per output channel: scale = max|w_row| / 127, q = round(w / scale). Weights are
           close to zero-centred and 255 levels leave little to gain from a zero point; symmetric codes make the
           GEMM one integer dot per row and a scale in the epilogue (torchao's int8 weight-only is the same scheme).
    int4   asymmetric, a fp32 scale and a uint8 zero point per group of `group_size` (default 128) consecutive
           inputs of a row: scale = (max - min) / 15, zero = round(-min / scale), q = clamp(round(w / scale) + zero,
           0, 15), with the range [min, max] widened to hold 0 (as GPTQ does: 0 stays exact, a constant group too).
           With only 16 levels, a symmetric code would waste its range on whichever side of zero a group is
           narrower and one of its 16 levels on the sign (-8..7 or -7..7); the zero point uses all 16 over the
           group's own range for one extra byte per 128 weights (bench/RESULTS.md: the measured error of both).
Either way |w - dequantized w| <= scale / 2 (tests/test_quant.py checks it).

What stays in full precision: embeddings (lookups, not GEMMs), norms, the MoE router (tiny, and its scores choose
the experts), and the head unless asked (quantizing it unties it from a tied embedding, so a tied head is refused).

A quantized layer is the model's own module class with its weight held as a QuantWeight: a parameter `name` becomes
the QuantWeight submodule `q{name}` (state-dict keys `...q_proj.qweight.qdata`, `.scale`, `.zero`). Its forward runs
the fused kernel on a GPU and the reference (dequantize, then matmul) on the CPU; reading `.weight` (or an MoE's
`.w_up`) dequantizes the whole weight, so code that reads weights (the loss head, counting) keeps working. Quantized
models are for inference: they hold buffers, not parameters.
"""
import torch
import torch.nn as nn

from model import LMHead, MoE, softcapped
from nanokernels.quant_gemm import dequantize, pack_int4, quant_matmul

SCHEMES = ("int8", "int4")
DEFAULT_GROUP = 128
BITS = {"int8": 8, "int4": 4}
INT8_MAX, INT4_MAX = 127, 15


# ------------------------------------------------------------------------------------------------------ the codes

def quantize_tensor(w, scheme, group_size=DEFAULT_GROUP):
    """(qdata, scale, zero) of a float weight (..., N, K); zero is None for int8. Computed in float64."""
    w = w.detach().double()
    if not torch.isfinite(w).all():
        raise ValueError("the weight holds NaN or inf: nothing meaningful to quantize")
    tiny = torch.finfo(torch.float32).tiny
    if scheme == "int8":
        scale = (w.abs().amax(-1) / INT8_MAX).clamp(min=tiny)
        q = (w / scale[..., None]).round().clamp(-INT8_MAX, INT8_MAX)
        return q.to(torch.int8), scale.float(), None
    groups = w.unflatten(-1, (-1, group_size))                                      # (..., N, K/G, G)
    low, high = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    scale = ((high - low) / INT4_MAX).clamp(min=tiny)
    zero = (-low / scale).round().clamp(0, INT4_MAX)
    codes = ((groups / scale[..., None]).round() + zero[..., None]).clamp(0, INT4_MAX).flatten(-2)
    return pack_int4(codes), scale.float(), zero.to(torch.uint8)


def check_group_size(scheme, group_size, width, name):
    """One line when int4's group size does not fit a weight with `width` inputs."""
    if scheme != "int4":
        return
    if group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be an even number >= 2 (two 4-bit codes share a byte), got {group_size}")
    if width % group_size:
        divisors = [g for g in (256, 128, 64, 32, 16, 8) if width % g == 0]
        hint = f"e.g. --group_size={divisors[0]}" if divisors else "or --scheme=int8"
        raise ValueError(f"group_size {group_size} does not divide {name}'s width {width} (its inputs): choose a "
                         f"group size that divides every layer's input width ({hint})")


class QuantWeight(nn.Module):
    """A weight (..., N, K) held as codes: buffers qdata (int8 (..., N, K), or uint8 (..., N, K/2) for int4), scale
    (fp32 (..., N) or (..., N, K/G)) and zero (uint8 (..., N, K/G), int4 only)."""

    def __init__(self, shape, scheme, group_size=DEFAULT_GROUP):
        super().__init__()
        *lead, N, K = shape
        self.shape, self.scheme, self.bits, self.group_size = tuple(shape), scheme, BITS[scheme], group_size
        if scheme == "int8":
            self.register_buffer("qdata", torch.zeros(*lead, N, K, dtype=torch.int8))
            self.register_buffer("scale", torch.zeros(*lead, N))
            self.register_buffer("zero", None)
        else:
            self.register_buffer("qdata", torch.zeros(*lead, N, K // 2, dtype=torch.uint8))
            self.register_buffer("scale", torch.zeros(*lead, N, K // group_size))
            self.register_buffer("zero", torch.zeros(*lead, N, K // group_size, dtype=torch.uint8))

    @classmethod
    def from_float(cls, w, scheme, group_size=DEFAULT_GROUP):
        module = cls(w.shape, scheme, group_size)
        qdata, scale, zero = quantize_tensor(w, scheme, group_size)
        module.qdata.copy_(qdata)
        module.scale.copy_(scale)
        if zero is not None:
            module.zero.copy_(zero)
        return module.to(w.device)

    def dequantize(self, dtype=torch.float32, expert=None):
        pick = (lambda t: t) if expert is None else (lambda t: None if t is None else t[expert])
        return dequantize(pick(self.qdata), pick(self.scale), pick(self.zero), self.bits, self.group_size, dtype)

    def linear(self, x, expert=None):
        """x (..., K) @ W^T (W = expert `expert` of a stack): the fused kernel on a GPU, in the autocast dtype when
        autocast is on (the kernel is not an op autocast knows); the reference elsewhere."""
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) and x.is_cuda else x.dtype
        pick = (lambda t: t) if expert is None else (lambda t: None if t is None else t[expert])
        y = quant_matmul(x.reshape(-1, x.size(-1)).to(dtype), pick(self.qdata), pick(self.scale), pick(self.zero),
                         self.bits, self.group_size)
        return y.view(*x.shape[:-1], y.size(-1))

    def extra_repr(self):
        group = f", group_size={self.group_size}" if self.scheme == "int4" else ""
        return f"{self.scheme}, shape={self.shape}{group}"


# ---------------------------------------------------------------------------------------------- quantized modules

def swapped(cls, module, qweights):
    """`module` as an instance of cls (a subclass of its class) with each parameter named in qweights replaced by the
    QuantWeight submodule q{name}; its other parameters, buffers and submodules are kept (not copied)."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    new._parameters = {k: v for k, v in module._parameters.items() if k not in qweights}
    new._buffers, new._modules = dict(module._buffers), dict(module._modules)
    for name, qweight in qweights.items():
        setattr(new, f"q{name}", qweight)
    return new


class QuantLinear(nn.Linear):
    weight = property(lambda self: self.qweight.dequantize())

    def forward(self, x):
        return self.qweight.linear(x)


class QuantLMHead(LMHead):
    """The head: logits through the kernel; the loss paths (val loss, per-token scores) on the dequantized weight."""
    weight = property(lambda self: self.qweight.dequantize())

    def forward(self, x, targets=None, softcap=0.0, per_token=False):
        if targets is None:
            logits = self.qweight.linear(x)
            return softcapped(logits.to(torch.promote_types(logits.dtype, torch.float32)), softcap)
        return super().forward(x, targets, softcap, per_token)


class QuantMoE(MoE):
    """Routed experts from int8 / int4 stacks: each expert's slice of tokens through the kernel (or reference)."""
    w_up = property(lambda self: self.qw_up.dequantize())
    w_down = property(lambda self: self.qw_down.dequantize())

    def use_grouped_mm(self, xs):
        return False

    def expert(self, e, x):
        return self.qw_down.linear(self.activation(self.qw_up.linear(x, e)), e)


# --------------------------------------------------------------------------------------------------- whole models

def quantized_names(model, head=False):
    """{parameter name: its weight's shape} of what gets quantized: the blocks' linear layers except the routers,
    the experts' stacks, and the head if asked."""
    names = {}
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            names[f"{name}.w_up"], names[f"{name}.w_down"] = module.w_up.shape, module.w_down.shape
        elif isinstance(module, nn.Linear) and name.startswith("blocks.") and not name.endswith("router"):
            names[f"{name}.weight"] = module.weight.shape
    if head:
        if model.config.tie_embeddings:
            raise ValueError("the head is tied to the embedding: quantizing it would untie them; leave --head=False")
        names["lm_head.weight"] = model.lm_head.weight.shape
    return names


def quantize_model(model, scheme, group_size=DEFAULT_GROUP, head=False, empty=False):
    """Swap the model's linear layers (and experts, and the head if asked) for quantized ones, in place; with empty,
    for QuantWeights of the right shapes to load a quantized state dict into. Returns the quantized parameter names.
    Every width is checked before anything changes (one-line ValueError)."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    names = quantized_names(model, head)
    for name, shape in names.items():
        check_group_size(scheme, group_size, shape[-1], name.removesuffix(".weight"))
    owners = {}
    for name in names:
        owner, param = name.rsplit(".", 1)
        owners.setdefault(owner, []).append(param)
    for owner, params in owners.items():
        module = model.get_submodule(owner)
        qweights = {p: (QuantWeight(getattr(module, p).shape, scheme, group_size) if empty
                        else QuantWeight.from_float(getattr(module, p), scheme, group_size)) for p in params}
        cls = QuantMoE if isinstance(module, MoE) else QuantLMHead if isinstance(module, LMHead) else QuantLinear
        parent, _, child = owner.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, swapped(cls, module, qweights))
    return list(names)


def quantization_of(ckpt):
    """The checkpoint's quantization record ({'scheme', 'group_size', 'head', 'layers'}), or None."""
    return ckpt.get("quantization") if isinstance(ckpt, dict) else None


def model_bytes(model):
    """Bytes of the model's parameters and persistent buffers, each tied tensor counted once."""
    seen, total = set(), 0
    for t in list(model.state_dict(keep_vars=True).values()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
