"""The attention visibility rule, written once: query i sees key j iff i - window < j <= i (window None: every
j <= i). model.py's masks, the kernel's reference (attention.py), the benchmarks and the FLOP count use these two;
the Triton kernels keep their in-kernel form of the same rule. It sits below both the model and the kernels, so
neither imports the other for it."""
import torch


def attention_mask(t_q, t_k, window, device):
    """Boolean (t_q, t_k) mask of the rule, queries at the last t_q of t_k positions (a prefill against a cache)."""
    i = torch.arange(t_k - t_q, t_k, device=device)[:, None]
    j = torch.arange(t_k, device=device)[None, :]
    mask = j <= i
    if window is not None:
        mask &= j > i - window
    return mask


def visible_pairs(seq_len, window):
    """(query, key) pairs the rule allows among seq_len positions: the sum over i of min(i + 1, window)."""
    w = seq_len if window is None else min(window, seq_len)
    return w * (w + 1) // 2 + (seq_len - w) * w
