"""Running on several processes or devices, in one place: the process group under torchrun, the model wrapped for
DDP, FSDP2 or XLA's SPMD FSDPv2, gradient sync per micro-step, sums and means over ranks, XLA's per-step graph
cut and batch sharding, and state moved to the CPU for saving. train.py calls these by name.

The parallel mode of a run is one word:
    'single'    one process on one device (CPU, a GPU, or one XLA device)
    'ddp'       torchrun, a full replica per rank, gradients all-reduced (DistributedDataParallel)
    'fsdp'      torchrun (or one process), parameters, gradients and optimizer state sharded (FSDP2, fully_shard)
    'xla_spmd'  one process driving every XLA device, parameters sharded along a 1-D mesh (SPMD FSDPv2)
"""
import functools
import os
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nanogpt.runtime import device_type, resolve_device

MODES = ("single", "ddp", "fsdp", "xla_spmd")


def init_distributed(device, backend, fsdp):
    """(rank, local_rank, world_size, device, mode) for a `device` setting. Under torchrun (RANK set) this process
    joins the group and takes its local GPU; FSDP needs a group even for a single process."""
    if device == "xla" or device.startswith("xla:"):
        if fsdp:  # SPMD must be switched on before any XLA tensor exists
            import torch_xla.runtime as xr
            xr.use_spmd()
        return 0, 0, 1, resolve_device(device), "xla_spmd" if fsdp else "single"
    device = resolve_device(device)
    if "RANK" not in os.environ:
        if not fsdp:
            return 0, 0, 1, device, "single"
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29517"))
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend=backend)
    return rank, local_rank, world, device, "fsdp" if fsdp else "ddp" if world > 1 else "single"


def barrier():
    if dist.is_initialized():
        dist.barrier(device_ids=[torch.cuda.current_device()] if dist.get_backend() == "nccl" else None)


def finish(message=None):
    """Exit on every rank together (message: error text, None: success). Ranks first wait for rank 0, which may
    still be plotting or saving: one that tears down the process group early can abort the others at exit."""
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()
    sys.exit(message)


def several_ranks():
    return dist.is_initialized() and dist.get_world_size() > 1


def mean_over_ranks(t):
    """t averaged over ranks, in place (unchanged in a single process)."""
    if several_ranks():
        dist.all_reduce(t, op=dist.ReduceOp.AVG)
    return t


def sum_over_ranks(t):
    """t summed over ranks, in place (unchanged in a single process)."""
    if several_ranks():
        dist.all_reduce(t)
    return t


# ------------------------------------------------------------------------------------------------- wrapping

def shard_fsdp2(model, param_dtype, compile_blocks):
    """FSDP2 on a model still on the meta device: every block its own unit (compiled first if asked), the embedding
    and the head their own units (the first and the last needed), then the root. bf16 compute, fp32 reductions."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.blocks:
        if compile_blocks:
            block.compile()
        fully_shard(block, mp_policy=policy)
    if not model.config.tie_embeddings:
        fully_shard(model.wte, mp_policy=policy)
        fully_shard(model.lm_head, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def wrap_fsdpv2(model):
    """XLA SPMD: a 1-D mesh over all devices; every block sharded with FSDPv2, batches split along the mesh."""
    import numpy as np
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr
    from torch_xla.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from torch_xla.experimental.spmd_fully_sharded_data_parallel import SpmdFullyShardedDataParallel

    from model import Block
    devices = xr.global_runtime_device_count()
    xs.set_global_mesh(xs.Mesh(np.arange(devices), (devices, 1), ("fsdp", "model")))

    def shard_output(output, mesh):  # hidden states (the state path) along the batch; the loss path's scalars stay
        if isinstance(output, torch.Tensor):
            xs.mark_sharding(output, mesh, ("fsdp",) + (None,) * (output.dim() - 1))
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={Block})
    return SpmdFullyShardedDataParallel(model, mesh=xs.get_global_mesh(), auto_wrap_policy=policy,
                                        shard_output=shard_output)


def describe_xla_sharding(model):
    """One line: how many parameter tensors SPMD sharded, with an example spec."""
    import torch_xla
    specs = [torch_xla._XLAC._get_xla_sharding_spec(p) for p in model.parameters()]
    sharded = [s for s in specs if "devices=" in s]
    return f"FSDPv2: {len(sharded)} of {len(specs)} parameter tensors sharded, e.g. {sharded[0] if sharded else 'none'}"


def wrap_for_training(model, mode, compile, device):
    """The model the loop calls: on XLA, MoE layers dispatch densely (static shapes) and under SPMD the FSDPv2
    wrapper; then torch.compile (under FSDP2 each block was compiled before sharding), then DDP. DDP leaves buffers
    per rank: the loop sums the MoE loads over ranks before updating the expert biases."""
    if device_type(device) == "xla":
        for moe in model.moe_layers():
            moe.dense_dispatch = True
    if mode == "xla_spmd":
        model = wrap_fsdpv2(model)
    if compile and mode != "fsdp":
        model = torch.compile(model)
    if mode == "ddp":
        ids = [int(device.split(":")[1])] if device.startswith("cuda:") else None
        model = DDP(model, device_ids=ids, broadcast_buffers=False)
    return model


def gradient_sync(model, sync):
    """Context for one micro-step's forward and backward: gradients are reduced across ranks only when `sync` (the
    last micro-step of an optimizer step)."""
    if isinstance(model, DDP):
        return nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return nullcontext()


# ------------------------------------------------------------------------------------------------------ XLA

def cut_xla_graph(device):
    """On XLA, end the lazy graph here (one compiled program per step); elsewhere nothing."""
    if device_type(device) == "xla":
        import torch_xla
        torch_xla.sync()


def shard_batch(mode, *tensors):
    """Under XLA SPMD one process feeds every device: split each batch along the mesh. Otherwise as they are."""
    if mode == "xla_spmd":
        import torch_xla.distributed.spmd as xs
        for t in tensors:
            xs.mark_sharding(t, xs.get_global_mesh(), ("fsdp",) + (None,) * (t.dim() - 1))
    return tensors


def xla_compilations():
    import torch_xla.debug.metrics as met
    data = met.metric_data("CompileTime")
    return data[0] if data else 0
