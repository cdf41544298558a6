"""Knowledge distillation (Hinton et al. 2015): a student learns a frozen teacher's next-token distribution.

At every counted position (target != -1) the student's loss mixes the data's cross-entropy with the forward KL
divergence from the teacher to the student, both distributions softened by a temperature T:

    loss = (1 - w) CE(y, p_s) + w T^2 KL(p_t^T || p_s^T),   p^T = softmax(logits / T)

summed over the positions like the cross-entropy (the objective then divides by the counted targets). The T^2 factor
is Hinton's convention: the KL's gradient in the logits scales as 1/T^2, so T^2 keeps the two terms' gradients of
comparable size whatever T (at T = 1 the KL term is the plain KL). `w` is distill_weight, T distill_temperature.
The KL runs over the tokenizer's ids only (both distributions renormalised there), so padded vocabulary rows of either
model play no part; the teacher must have the data's tokenizer.

Memory: neither model holds the (rows, vocab) logits whole. The student's forward stops at its hidden states, and the
loss goes over chunks of rows (model.py's LOSS_CHUNK_ELEMENTS): in each chunk both heads' logits are computed, the
losses taken, and the chunk's logits dropped; backward recomputes them chunk by chunk (activation checkpointing), so
the peak is one chunk of each model's logits, as for the plain loss. The teacher runs without gradients.

An MoE student's balance loss (moe_aux_alpha) comes back beside the two losses, and the objective adds it as the plain
loss does; the aux-loss-free bias balancing runs as in any training.
"""
import functools

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from model import LOSS_CHUNK_ELEMENTS, softcapped


def wider(t):
    return t.to(torch.promote_types(t.dtype, torch.float32))


def chunk_losses(h_student, h_teacher, w_student, w_teacher, targets, temperature, softcaps, vocab):
    """(summed cross-entropy, summed KL(teacher^T || student^T)) over one chunk of rows, in at least fp32."""
    student = softcapped(wider(F.linear(h_student, w_student)), softcaps[0])
    with torch.no_grad():
        teacher = softcapped(wider(F.linear(h_teacher, w_teacher)), softcaps[1])[:, :vocab]
    ce = F.cross_entropy(student, targets, ignore_index=-1, reduction="sum")
    log_student = F.log_softmax(student[:, :vocab] / temperature, -1)
    log_teacher = F.log_softmax(teacher / temperature, -1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    return ce, (kl * (targets >= 0)).sum()


def distill_losses(student, student_head, softcap, teacher, x, y, temperature, vocab):
    """(summed CE of the student on targets y, summed KL(teacher^T || student^T) over the same positions, the
    student's MoE balance loss). student: the model the loop calls (wrapped or not: its forward without targets
    gives hidden states, and with with_balance their balance loss); student_head: the student's raw output layer;
    teacher: a frozen GPT."""
    h, balance = student(x, with_balance=True)
    h = h.flatten(0, 1)
    with torch.no_grad():
        h_teacher = teacher(x).flatten(0, 1)
    targets = y.flatten()
    rows = max(1, LOSS_CHUNK_ELEMENTS // max(student_head.out_features, teacher.lm_head.out_features))
    softcaps = (softcap, teacher.config.logit_softcap)
    run = functools.partial(chunk_losses, temperature=temperature, softcaps=softcaps, vocab=vocab)
    if torch.is_grad_enabled():  # keep only the chunk's inputs; recompute its logits in backward
        run = functools.partial(torch.utils.checkpoint.checkpoint, run, use_reentrant=False)
    ce = kl = 0.0
    for i in range(0, len(targets), rows):
        c, k = run(h[i:i + rows], h_teacher[i:i + rows], student_head.weight, teacher.lm_head.weight,
                   targets[i:i + rows])
        ce, kl = ce + c, kl + k
    return ce, kl, balance


def mixed_loss(ce, kl, weight, temperature):
    """(1 - w) CE + w T^2 KL."""
    return (1 - weight) * ce + weight * temperature ** 2 * kl


# --------------------------------------------------------------------------------------------------- the teacher

def load_teacher(source, tokenizer, block_size, device, recorded_fingerprint=None):
    """The frozen teacher GPT of `source` (a run folder, ckpt.pt, step_N/ or hf:FOLDER; a LoRA run merged) on
    `device`, at the run's block_size, and its identity {teacher_from, teacher_fingerprint}. ValueError (one line)
    for a teacher of another tokenizer, or, resuming, one whose weights changed since the run started."""
    from nanogpt.checkpoint import (
        clean_state_dict,
        model_from_checkpoint,
        read_checkpoint,
        tokenizer_spec,
        weights_fingerprint,
    )
    from nanogpt.tokenizer import Tokenizer
    ckpt = read_checkpoint(source)
    spec = tokenizer_spec(ckpt, source)
    if spec != tokenizer.spec:
        raise ValueError(f"config error: the teacher {source} uses the {Tokenizer(spec).describe()} tokenizer but the "
                         f"data is {tokenizer.describe()}: distill from a teacher trained with the data's tokenizer")
    fingerprint = weights_fingerprint(clean_state_dict(ckpt["model"]))
    if recorded_fingerprint and fingerprint != recorded_fingerprint:
        raise ValueError(f"the teacher {source} is not the one this run started from (its weights changed): restore "
                         "it, or start a new run into another --out_dir")
    ckpt = dict(ckpt, model_args=dict(ckpt["model_args"], block_size=block_size, dropout=0.0))
    teacher = model_from_checkpoint(ckpt, source).to(device).eval().requires_grad_(False)
    return teacher, {"teacher_from": source, "teacher_fingerprint": fingerprint}
