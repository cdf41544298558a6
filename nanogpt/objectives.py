"""The training objective, chosen once before the loop: what one micro-batch contributes to the step's gradient.

    'next_token'  pretraining and SFT (SFT's data marks the targets it does not train with -1): cross-entropy
    'dpo'         preference pairs against a frozen reference model: DPO, cDPO or IPO (nanogpt/posttrain.py)
    'distill'     next-token data and a frozen teacher: cross-entropy mixed with KL to the teacher (nanogpt/distill.py)

A step averages over its whole global batch (micro-batches x ranks): `batch_weights` gives each micro-batch's weight
so that summing the weighted losses over micro-batches, and averaging gradients over ranks (DDP, FSDP), is the mean
over every counted target, or over every pair. The MoE balance loss (model.py: already a mean over a micro-batch's
sequences, at strength moe_aux_alpha) is added at 1 / micro-batches, so it too ends up a mean over the global batch,
whatever the accumulation or the world size. Evaluation reports the cross-entropy (or DPO loss) only.

Multi-token prediction (model.py, mtp_depth D > 0) adds lambda / D times the MTP depths' summed cross-entropies,
weighted like the main one: per counted main target, as DeepSeek-V3 defines each depth's loss (1/T over the T - k
targets it has). lambda (mtp_weight) may follow a schedule; at 0 the MTP modules are not run at all.
"""
import torch

from nanogpt.distill import distill_losses, mixed_loss
from nanogpt.parallel import cut_xla_graph, mean_over_ranks, sum_over_ranks
from nanogpt.posttrain import dpo_objective

KINDS = ("next_token", "dpo", "distill")


def batch_weights(kind, batches, world_size):
    """(weight of each micro-batch's loss, targets counted over the global batch or None): for next_token
    world_size / counted (the cross-entropy is a sum), for dpo 1 / micro-batches (its loss is a mean over pairs)."""
    if kind == "dpo":
        return 1 / len(batches), None
    counted = sum_over_ranks(sum((y >= 0).sum() for _, y in batches).float())
    return world_size / counted.clamp(min=1), counted


def make_objective(kind, model, accumulation, reference=None, beta=0.1, label_smoothing=0.0, ipo=False,
                   distill=None, mtp_weight=lambda: 0.0):
    """objective(batch, weight) -> (the micro-batch's loss to backpropagate, its metrics as detached tensors, not
    yet weighted). accumulation: micro-batches per step. dpo: `reference` is the frozen model, beta, label_smoothing
    and ipo as in posttrain.dpo_loss. distill: a dict of teacher, head (the student's raw output layer), softcap,
    weight, temperature and vocab (the tokenizer's ids); its metrics' loss is the data cross-entropy alone.
    mtp_weight: a function giving the MTP loss weight lambda now (next_token)."""
    if kind not in KINDS:
        raise ValueError(f"objective must be one of {KINDS}, got {kind!r}")

    def next_token(batch, weight):
        lam = mtp_weight()
        if not lam:
            ce, balance = model(*batch)
            return ce * weight + balance / accumulation, {"loss": ce.detach().float()}
        ce, balance, mtp_ce = model(*batch, mtp=True)
        mtp_loss = mtp_ce.mean()  # lambda / D * sum over depths
        return ((ce + lam * mtp_loss) * weight + balance / accumulation,
                {"loss": ce.detach().float(), "mtp_loss": mtp_loss.detach().float()})

    def dpo(batch, weight):
        loss, balance, stats = dpo_objective(model, reference, batch, beta, label_smoothing, ipo)
        return loss * weight + balance / accumulation, stats

    def distillation(batch, weight):
        d = distill
        ce, kl, balance = distill_losses(model, d["head"], d["softcap"], d["teacher"], *batch, d["temperature"],
                                         d["vocab"])
        loss = mixed_loss(ce, kl, d["weight"], d["temperature"])
        return loss * weight + balance / accumulation, {"loss": ce.detach().float(), "kl": kl.detach().float()}

    return {"dpo": dpo, "distill": distillation}.get(kind, next_token)


@torch.no_grad()
def evaluate(objective, kind, batches, world_size, device):
    """The objective's metrics over one split's evaluation batches, averaged over ranks: the mean loss over the
    counted targets, or for pairs the mean DPO statistics (the model in eval mode: no balance loss)."""
    weight, _ = batch_weights(kind, batches, world_size)
    totals = {}
    for batch in batches:
        _, batch_metrics = objective(batch, weight)
        for k, v in batch_metrics.items():
            totals[k] = totals.get(k, 0.0) + v * weight  # summed on the device: one host sync per split
        cut_xla_graph(device)
    return {k: mean_over_ranks(v).item() for k, v in totals.items()}
