"""What post-training adds to the training loop: a base checkpoint made ready for the chat tokens, the
log-probability of a response, and the DPO loss.

New tokens. A base GPT-2 model never saw the chat tokens (tokenizer.chat_spec(), ids 50257..50262): their input
embeddings are untouched initial values and the head only ever learned to push their logits down. When fine-tuning
starts from such a checkpoint, `adapt_checkpoint` sets those rows of the embedding and of the head to the mean of
the checkpoint's trained rows (ids below its tokenizer's vocabulary), so a new token starts as an average token
instead of noise, and grows a checkpoint with an unpadded vocabulary (50,257 rows) to the run's padded one (50,304),
the added rows also the mean.

DPO (Rafailov et al. 2023). With log-probs of each response, for policy π and frozen reference,
    h = (log π(chosen) - log π(rejected)) - (log π_ref(chosen) - log π_ref(rejected))
    DPO   loss = -log σ(β h)
    cDPO  loss = -(1 - ε) log σ(β h) - ε log σ(-β h)   (label smoothing ε: a label is wrong with probability ε)
    IPO   loss = (h - 1/(2β))²                          (Azar et al. 2023: h is pulled to a target, not to infinity)
averaged over the pairs. The reward of a reply is β (log π - log π_ref); the margin is chosen minus rejected reward,
the accuracy the fraction of pairs whose chosen reward is higher (a tie, as at the first step, counts as wrong).
DPO's log-probs are summed over the response's tokens. IPO's are their mean per response token (length-normalised,
as TRL computes it): a summed h grows with the reply's length, so the target 1/(2β) would mean a different thing
for short and long replies.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F

from nanogpt.tokenizer import Tokenizer, spec_extends

# ------------------------------------------------------------------------------------------------------ new tokens

def with_mean_rows(weight, known, vocab_size, new_ids):
    """weight (rows, d) grown to vocab_size rows; the added rows and the rows of new_ids set to the mean of the
    first `known` rows."""
    mean = weight[:known].float().mean(0).to(weight.dtype)
    grown = torch.cat([weight, mean.expand(vocab_size - len(weight), -1)])
    grown[new_ids] = mean
    return grown


def adapt_checkpoint(checkpoint, spec, vocab_size):
    """(checkpoint ready to train with tokenizer `spec` and `vocab_size` embedding rows, a message saying what was
    initialised or None when nothing was). The input is not changed. A ValueError when the data's tokenizer is not
    the checkpoint's (possibly plus special tokens), or the checkpoint has more rows than vocab_size."""
    base = checkpoint.get("tokenizer", spec)  # a checkpoint that names no tokenizer is taken to be the data's
    if not spec_extends(spec, base):
        raise ValueError(f"the checkpoint was trained with the {Tokenizer(base).describe()} tokenizer but the data is "
                         f"{Tokenizer(spec).describe()}: use data of the checkpoint's tokenizer")
    rows = checkpoint["model_args"]["vocab_size"]
    if rows > vocab_size:
        raise ValueError(f"the checkpoint has {rows:,} embedding rows, more than this run's {vocab_size:,}")
    added = {name: i for name, i in spec.get("special", {}).items() if name not in base.get("special", {})}
    if rows == vocab_size and not added:
        return checkpoint, None
    known = Tokenizer(base).vocab_size  # the ids the checkpoint was trained on
    state = {key: with_mean_rows(value, known, vocab_size, sorted(added.values()))
             if key.endswith(("wte.weight", "lm_head.weight")) else value for key, value in checkpoint["model"].items()}
    notes = []
    if added:
        notes.append(f"{len(added)} tokens new to the checkpoint ({', '.join(added)}): their embedding and output "
                     f"rows start at the mean of its {known:,} trained rows")
    if rows < vocab_size:
        notes.append(f"its vocabulary grew from {rows:,} to {vocab_size:,} rows (the added rows also the mean)")
    adapted = dict(checkpoint, model=state, model_args=dict(checkpoint["model_args"], vocab_size=vocab_size),
                   tokenizer=spec)
    return adapted, "; ".join(notes)


# ------------------------------------------------------------------------------------------------------------ DPO

def response_logprobs(model, x, y, mean=False):
    """((B,) log-probability of each row's targets y given x over the positions where y != -1 (the response):
    summed, or with `mean` per response token; the forward's MoE balance loss)."""
    token_losses, balance = model(x, y, per_token=True)
    logprobs = -token_losses.sum(1)
    if mean:
        logprobs = logprobs / (y >= 0).sum(1).clamp(min=1)
    return logprobs, balance


def pair_logprobs(model, x_chosen, y_chosen, x_rejected, y_rejected, mean=False):
    """(chosen, rejected, balance loss): response log-probs from one forward over both (a DDP model must see one
    forward per backward; TRL's concatenated forward)."""
    logprobs, balance = response_logprobs(model, torch.cat([x_chosen, x_rejected]), torch.cat([y_chosen, y_rejected]),
                                          mean)
    return (*logprobs.chunk(2), balance)


class DPOStats(NamedTuple):
    loss: torch.Tensor                 # mean over the pairs, differentiable in the policy's log-probs
    chosen_reward: torch.Tensor        # mean β (log π - log π_ref) of the chosen replies
    rejected_reward: torch.Tensor      # the same for the rejected replies
    margin: torch.Tensor               # mean chosen minus rejected reward
    accuracy: torch.Tensor             # fraction of pairs whose chosen reward is higher
    likelihood_accuracy: torch.Tensor  # fraction whose chosen reply the policy finds likelier (reference's: "before")


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.1, label_smoothing=0.0,
             ipo=False):
    """DPO (or cDPO with label_smoothing, or IPO) on (B,) response log-probs (summed for DPO, per-token means for
    IPO: see pair_logprobs); no gradient reaches the reference's tensors."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if ipo and label_smoothing:
        raise ValueError("label smoothing is a variant of the DPO loss, not of IPO: set one of them")
    chosen_ratio = policy_chosen - reference_chosen.detach()
    rejected_ratio = policy_rejected - reference_rejected.detach()
    h = chosen_ratio - rejected_ratio
    if ipo:
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    chosen_reward, rejected_reward = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    return DPOStats(losses.mean(), chosen_reward.mean(), rejected_reward.mean(),
                    (chosen_reward - rejected_reward).mean(), (chosen_reward > rejected_reward).float().mean(),
                    (policy_chosen.detach() > policy_rejected.detach()).float().mean())


def dpo_objective(model, reference, batch, beta, label_smoothing=0.0, ipo=False):
    """(DPO loss of a micro-batch of pairs (x_chosen, y_chosen, x_rejected, y_rejected), the policy forward's MoE
    balance loss, the statistics as detached fp32 tensors) with `reference` frozen. IPO compares per-token mean
    log-probs, DPO summed ones."""
    *policy, balance = pair_logprobs(model, *batch, mean=ipo)
    with torch.no_grad():
        *frozen, _ = pair_logprobs(reference, *batch, mean=ipo)
    stats = dpo_loss(*policy, *frozen, beta, label_smoothing, ipo)
    return stats.loss, balance, {k: v.detach().float() for k, v in stats._asdict().items()}
