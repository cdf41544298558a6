"""Quantize a checkpoint's weights for inference: int8 per output channel or int4 group-wise (nanogpt/quant.py).

    python tools/quantize.py --model=out --out_dir=out-int8                      # int8 weight-only
    python tools/quantize.py --model=out --out_dir=out-int4 --scheme=int4        # int4, groups of 128 inputs
    python tools/quantize.py --model=out --out_dir=out-int4 --scheme=int4 --group_size=64 --head=True

The model is a run folder (its ckpt.pt, or the newest sharded step_N/), a ckpt.pt path, a step_N/ folder, or hf:PATH.
The quantized ckpt.pt keeps the model's architecture, tokenizer and training record, drops the optimizer state, and
records the scheme; sample.py, chat.py, eval.py and serve.py load it like any other. The blocks' linear layers and
the MoE experts are quantized; embeddings, norms and routers stay as they are, the head too unless --head=True.
An already-quantized checkpoint is refused (quantize the one it came from), as is a group size that does not
divide a layer's input width, and an out_dir that already holds a checkpoint (unless --overwrite=True).
"""
import os
import sys
from typing import Literal

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from configurator import at_least, configure, require  # noqa: E402
from nanogpt.checkpoint import has_checkpoint, model_from_checkpoint, read_checkpoint, save_checkpoint  # noqa: E402
from nanogpt.quant import DEFAULT_GROUP, SCHEMES, model_bytes, quantization_of, quantize_model  # noqa: E402

model = "out"                  # the checkpoint to quantize
out_dir = "out-int8"           # the quantized ckpt.pt goes here
scheme: Literal[SCHEMES] = "int8"
group_size = DEFAULT_GROUP     # int4: inputs per scale and zero point (must divide every layer's input width)
head = False                   # also quantize the output head (not with tied embeddings)
overwrite = False              # replace a checkpoint already in out_dir


def quantized_checkpoint(ckpt, source):
    """The checkpoint dict with the model's weights quantized and the scheme recorded."""
    done = quantization_of(ckpt)
    if done:
        raise ValueError(f"{source} is already quantized ({done['scheme']}): quantize the unquantized checkpoint it "
                         "came from")
    net = model_from_checkpoint(ckpt, source)
    before = model_bytes(net)
    layers = quantize_model(net, scheme, group_size, head)
    kept = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer")}
    record = {"scheme": scheme, "group_size": group_size, "head": head, "layers": layers}
    print(f"{source}: {len(layers)} weights quantized to {scheme}"
          f"{f' (groups of {group_size})' if scheme == 'int4' else ''}; model {before / 2**20:.2f} MiB -> "
          f"{model_bytes(net) / 2**20:.2f} MiB")
    return dict(kept, model=net.state_dict(), quantization=record)


def main():
    config = configure(globals())
    at_least(config, 1, "group_size")
    require(overwrite or not has_checkpoint(out_dir), f"{out_dir} already holds a checkpoint: pass --overwrite=True "
            "or another --out_dir")
    try:
        ckpt = quantized_checkpoint(read_checkpoint(model, quantized_ok=True), model)
        os.makedirs(out_dir, exist_ok=True)
        save_checkpoint(ckpt, os.path.join(out_dir, "ckpt.pt"))
    except (OSError, RuntimeError, ValueError) as e:  # a missing / unreadable / quantized model, a bad width
        raise SystemExit(str(e))
    path = os.path.join(out_dir, "ckpt.pt")
    print(f"-> {path} ({os.path.getsize(path) / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
