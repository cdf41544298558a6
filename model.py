"""A GPT in one file: RoPE, MQA/GQA, hybrid local (sliding-window) / global attention, cross-layer
KV sharing, DeepSeek-V3-style mixture-of-experts, optional fp8 matmuls, and KV-cached generation.

Layer plan. `attn_pattern` is tiled over the layers ("LLLLLG": five sliding-window layers, then one
global). Runs of adjacent layers of the same kind are cut into groups of `kv_share` layers that
share one K/V: the first layer of a group (the producer) projects K and V, the others (consumers)
own no K/V weights and attend to the producer's. With `share_global_kv` every global layer uses the
first global layer's K/V (Character.AI's design). The KV cache stores one K/V per group: local
groups in a ring of `local_window` slots, global groups in full.
"""
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# the visibility rule, below model and kernels
from nanokernels.mask import attention_mask, visible_pairs


@dataclass
class GPTConfig:
    block_size: int = 256
    vocab_size: int = 65
    n_layer: int = 6
    n_embd: int = 384
    n_head: int = 6
    # 1 = multi-query, n_head (or 0) = multi-head, in between = grouped-query
    n_kv_head: int = 0
    # 0 = n_embd // n_head; set for heads wider or narrower than that (e.g. Qwen3)
    head_dim: int = 0
    # > 0: multi-head latent attention (DeepSeek-V2/V3): K and V are expanded from one normed latent of this
    # width per token, and the cache holds only that latent and one shared RoPE key (MLA below)
    kv_lora_rank: int = 0
    q_lora_rank: int = 0          # MLA: > 0 = queries from a normed latent of this width; 0 = one projection
    qk_nope_head_dim: int = 0     # MLA: per-head query/key width without RoPE; 0 = head_dim
    qk_rope_head_dim: int = 0     # MLA: width of the RoPE part (one rope key for all heads); 0 = head_dim // 2
    v_head_dim: int = 0           # MLA: per-head value width; 0 = head_dim
    mlp: str = "swiglu"           # 'swiglu' or 'relu2'
    # 0: 8/3·n_embd for swiglu, 4·n_embd for relu2 (rounded up to a multiple of 64)
    mlp_hidden: int = 0
    qk_norm: bool = True          # RMSNorm on queries and keys (stabilises higher learning rates)
    tie_embeddings: bool = False
    dropout: float = 0.0
    rope_theta: float = 10000.0
    attn_pattern: str = "G"       # tiled over layers: L = sliding window, G = global causal
    local_window: int = 1024      # a local query at i sees keys in (i - local_window, i]
    kv_share: int = 1             # adjacent same-kind layers per shared K/V (2 = CLA2)
    share_global_kv: bool = False # all global layers share the first global layer's K/V
    n_expert: int = 0             # routed experts; 0 = dense MLP everywhere
    n_expert_active: int = 2      # top-k
    n_shared_expert: int = 1      # always-on experts
    moe_hidden: int = 0           # expert width; 0 = mlp width / n_expert_active
    n_dense_layers: int = 1       # the first layers keep a dense MLP
    moe_bias_gamma: float = 1e-3  # aux-loss-free balancing: bias step per optimizer step
    moe_aux_alpha: float = 1e-4   # sequence-wise balance loss weight (0 disables)
    norm_eps: float = 1e-6        # RMSNorm epsilon
    # > 0: logits = c * tanh(logits / c) (Gemma 2; modded-nanogpt); 0 = off
    logit_softcap: float = 0.0
    # > 0: k extra token embeddings mixed into V of the first and last k K/V producers
    value_embeds: int = 0
    # the residual-stream writers (o_proj, down_proj, experts' w_down) start at zero
    zero_init_proj: bool = False
    # multi-token prediction (DeepSeek-V3): D sequential modules predicting tokens t+2 .. t+1+D
    mtp_depth: int = 0
    # product-key memory (Lample et al. 2019; Berges et al. 2024) in place of these layers' MLPs,
    # e.g. (2,) or (1, 3): memory_keys^2 values of n_embd, memory_topk read per head and token
    memory_layers: tuple = ()
    memory_keys: int = 128        # sub-keys per half: memory_keys^2 slots
    memory_topk: int = 16         # values read per head (and sub-keys kept per half)
    memory_heads: int = 4
    memory_key_dim: int = 64      # query / product-key width per head (two halves)
    memory_gated: bool = True     # Memory+: the read gated like a SwiGLU's up projection

    def __post_init__(self):
        def check(ok, message):
            if not ok:
                raise ValueError(f"GPTConfig: {message}")
        self.n_kv_head = self.n_kv_head or self.n_head
        if not self.head_dim:
            check(self.n_head >= 1 and self.n_embd % self.n_head == 0,
                  f"n_embd {self.n_embd} must be divisible by n_head {self.n_head} "
                  "(or set head_dim)")
            self.head_dim = self.n_embd // self.n_head
        check(self.attn_pattern and set(self.attn_pattern) <= {"L", "G"},
              f"attn_pattern {self.attn_pattern!r} may only contain L (local) and G (global), "
              "e.g. 'LLLLLG'")
        check(self.n_head % self.n_kv_head == 0,
              f"n_head {self.n_head} must be a multiple of n_kv_head {self.n_kv_head}")
        check(self.head_dim % 2 == 0, f"head_dim {self.head_dim} must be even for RoPE")
        check(self.kv_share >= 1, f"kv_share must be >= 1, got {self.kv_share}")
        check(self.local_window >= 1, f"local_window must be >= 1, got {self.local_window}")
        check(self.value_embeds >= 0, f"value_embeds must be >= 0, got {self.value_embeds}")
        check(self.mlp in ("swiglu", "relu2"), f"mlp must be 'swiglu' or 'relu2', got {self.mlp!r}")
        if self.kv_lora_rank:
            self.check_mla(check)
        else:
            check(not (self.q_lora_rank or self.qk_nope_head_dim or self.qk_rope_head_dim or self.v_head_dim),
                  "q_lora_rank, qk_nope_head_dim, qk_rope_head_dim and v_head_dim are MLA settings: "
                  "set kv_lora_rank > 0 to use them")
        if self.n_expert:
            check(1 <= self.n_expert_active <= self.n_expert,
                  f"n_expert_active {self.n_expert_active} must be between 1 and "
                  f"n_expert {self.n_expert}")
            check(0 <= self.n_dense_layers <= self.n_layer,
                  "n_dense_layers must be in [0, n_layer]")
        check(self.mtp_depth >= 0, f"mtp_depth must be >= 0, got {self.mtp_depth}")
        self.memory_layers = tuple(self.memory_layers)  # a checkpoint may hold a list
        check(all(isinstance(i, int) and 0 <= i < self.n_layer for i in self.memory_layers),
              f"memory_layers {self.memory_layers!r} must list layers in [0, {self.n_layer}), "
              "e.g. (2,) or (1, 3)")
        if self.memory_layers:
            check(1 <= self.memory_topk <= self.memory_keys,
                  f"memory_topk {self.memory_topk} must be between 1 and memory_keys "
                  f"{self.memory_keys}")
            check(self.memory_heads >= 1 and self.memory_key_dim % 2 == 0 < self.memory_key_dim,
                  "memory_heads must be >= 1 and memory_key_dim even (two halves)")

    def check_mla(self, check):
        """Resolve MLA's 0 = default widths (DeepSeek-V3's proportions) and refuse what cannot combine with it."""
        self.qk_nope_head_dim = self.qk_nope_head_dim or self.head_dim
        self.qk_rope_head_dim = self.qk_rope_head_dim or self.head_dim // 2
        self.v_head_dim = self.v_head_dim or self.head_dim
        check(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim {self.qk_rope_head_dim} must be even for RoPE")
        check(min(self.kv_lora_rank, self.q_lora_rank) >= 0, "kv_lora_rank and q_lora_rank must be >= 0")
        check(self.n_kv_head == self.n_head,
              f"n_kv_head={self.n_kv_head} with kv_lora_rank={self.kv_lora_rank}: MLA has no K/V heads to group "
              "(its cache is one latent per token); leave n_kv_head unset")
        check(not self.qk_norm, "qk_norm=True with kv_lora_rank > 0: a per-head norm on the keys cannot be absorbed "
              "into the query; MLA normalises its latents instead (DeepSeek): set qk_norm=False")
        check(self.kv_share == 1 and not self.share_global_kv,
              f"kv_share={self.kv_share}, share_global_kv={self.share_global_kv} with kv_lora_rank > 0: "
              "cross-layer sharing of the MLA latent is not implemented: set kv_share=1, share_global_kv=False")
        check(not self.value_embeds, f"value_embeds={self.value_embeds} with kv_lora_rank > 0: MLA never "
              "materialises per-head values when decoding, so there is no V to mix them into: set value_embeds=0")

    @property
    def mla(self):
        return self.kv_lora_rank > 0

    @property
    def rope_dim(self):
        """The width RoPE rotates: MLA's rope part, else the whole head."""
        return self.qk_rope_head_dim if self.mla else self.head_dim

    @property
    def hidden(self):
        if self.mlp_hidden:
            return self.mlp_hidden
        width = 8 * self.n_embd // 3 if self.mlp == "swiglu" else 4 * self.n_embd
        return 64 * math.ceil(width / 64)


    @property
    def expert_hidden(self):
        return self.moe_hidden or max(1, self.hidden // self.n_expert_active)


def layer_plan(cfg):
    """For each layer: (kind 'L'/'G', KV-sharing group id, whether it produces the group's K/V)."""
    kinds = [cfg.attn_pattern[i % len(cfg.attn_pattern)] for i in range(cfg.n_layer)]
    plan, n_kv_groups, run_start = [], 0, 0
    global_kv_group = None
    for i, kind in enumerate(kinds):
        if i > 0 and kinds[i - 1] != kind:
            run_start = i
        if kind == "G" and cfg.share_global_kv and global_kv_group is not None:
            plan.append((kind, global_kv_group, False))
            continue
        if (i - run_start) % cfg.kv_share == 0:  # a new group starts every kv_share layers of a run
            plan.append((kind, n_kv_groups, True))
            n_kv_groups += 1
        else:
            plan.append((kind, plan[-1][1], False))
        if kind == "G" and global_kv_group is None:
            global_kv_group = plan[-1][1]
    return plan


def value_embed_plan(cfg):
    """{layer: value-embedding table}: table j feeds the j-th K/V-producing layer from the start and
    the j-th from the end (modded-nanogpt's pattern: the same token identity re-enters V near the
    input and near the output)."""
    producers = [i for i, (_, _, produces) in enumerate(layer_plan(cfg)) if produces]
    plan = {}
    for j in range(min(cfg.value_embeds, len(producers))):
        plan[producers[j]] = plan[producers[-1 - j]] = j
    return plan


# -------------------------------------------------------------------------------------------- parts

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def rope_tables(start, length, head_dim, theta, device):
    """cos and sin (length, head_dim/2) for positions start..start+length-1; computed per call
    (cheap, compile-friendly). start may be a (B,) tensor, one start per row (a batch of sequences
    at different positions): then (B, 1, length, head_dim/2)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)
                         / head_dim)
    if torch.is_tensor(start):
        positions = start.to(device, torch.float32)[:, None] + torch.arange(length, device=device)
        freqs = (positions[..., None] * inv_freq).unsqueeze(1)
        return freqs.cos(), freqs.sin()
    freqs = torch.outer(torch.arange(start, start + length, device=device, dtype=torch.float32),
                        inv_freq)
    return freqs.cos(), freqs.sin()


def apply_rope(x, cos, sin):
    """Rotary position embedding, rotate-half form, on x (B, H, T, D)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)



def attend(q, k, v, window, impl, dropout=0.0):
    """Causal attention of q (B, Hq, Tq, D) over k, v (B, Hkv, Tk, D), keys aligned to the end of
    the query span. window may instead be a boolean mask (B, 1, Tq, Tk), True = visible: a batch
    of sequences at different positions (nanogpt/engine.py's cache)."""
    if torch.is_tensor(window):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=window, dropout_p=dropout,
                                              enable_gqa=q.size(1) != k.size(1))
    t_q, t_k = q.size(2), k.size(2)
    if window is not None and window >= t_k:
        window = None  # a window covering every key is plain causal attention
    if impl == "triton" and dropout == 0.0:
        from nanokernels.attention import flash_attention, flash_decode
        # a decode step: query heads of a K/V group share each K/V read
        if t_q == 1 and not torch.is_grad_enabled():
            return flash_decode(q, k, v, window=window)
        return flash_attention(q, k, v, window=window)
    gqa = q.size(1) != k.size(1)
    # one query at the end sees the last `window` keys it is given (all of them without a window)
    if t_q == 1:
        if window is not None:
            k, v = k[:, :, -window:], v[:, :, -window:]
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, enable_gqa=gqa)
    if window is None and t_q == t_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout,
                                              enable_gqa=gqa)
    mask = attention_mask(t_q, t_k, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                          enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, cfg, kind, kv_group, produces_kv, attn_impl="sdpa", takes_value_embed=False):
        super().__init__()
        self.cfg, self.kv_group, self.produces_kv = cfg, kv_group, produces_kv
        # the kernel: a choice of the process running the model, not of its config
        self.attn_impl = attn_impl
        self.window = cfg.local_window if kind == "L" else None
        d, hd = cfg.n_embd, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.n_head * hd, bias=False)
        if produces_kv:  # consumers of a shared K/V own no K/V weights at all
            self.k_proj = nn.Linear(d, cfg.n_kv_head * hd, bias=False)
            self.v_proj = nn.Linear(d, cfg.n_kv_head * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm and produces_kv else nn.Identity()
        if takes_value_embed:  # v <- a v + b ve, (a, b) learned from (0.5, 0.5)
            self.ve_mix = nn.Parameter(torch.full((2,), 0.5))
        # interpretability hook points (nanogpt/interp.py); None costs one check per point
        self.hook = None

    def forward(self, x, cos, sin, kv, cache, ve=None):
        """Returns (output, kv): a producer computes kv = (k, v, window); a consumer is handed its
        producer's. ve: this layer's value embedding of the tokens (B, T, n_kv_head * head_dim),
        mixed into V."""
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        q = apply_rope(self.q_norm(self.q_proj(x).view(B, T, -1, hd).transpose(1, 2)), cos, sin)
        hook, window = self.hook, self.window
        if hook is not None:
            q = hook("q", q)
        if self.produces_kv:
            k = apply_rope(self.k_norm(self.k_proj(x).view(B, T, -1, hd).transpose(1, 2)), cos, sin)
            v = self.v_proj(x).view(B, T, -1, hd).transpose(1, 2)
            if ve is not None:
                v = (self.ve_mix[0] * v
                     + self.ve_mix[1] * ve.view(B, T, -1, hd).transpose(1, 2).to(v.dtype))
            if hook is not None:  # before packing: the group's consumers see a patched K/V too
                k, v = hook("k", k), hook("v", v)
            if cache is not None:  # the cache says what the queries see: a window or a mask
                k, v, window = cache.update(self.kv_group, k, v, window)
            kv = (k, v, window)
        k, v, window = kv
        dropout = self.cfg.dropout if self.training else 0.0
        if hook is None:
            y = attend(q, k, v, window, self.attn_impl, dropout)
        else:  # the pattern (computed only when asked for) and each head's output z
            y = hook.attend(q, k, v, window, self.attn_impl, dropout)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), kv


# DeepSeek's latent norms keep RMSNorm's default epsilon whatever the model's norm_eps (their code and HF's)
MLA_LATENT_NORM_EPS = 1e-6


class MLA(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3). Each token's K and V come from one latent c (kv_lora_rank
    wide, RMS-normed) through the per-head up-projection kv_b_proj = [W_UK; W_UV], plus one RoPE key k_r shared by
    all heads (decoupled RoPE: position never passes through the latent). The cache holds only (c, k_r).
    Prefill and training expand c into per-head keys [k_nope; k_r] and values (the expanded form). A decode step
    absorbs W_UK into the query (q_nope W_UK scores against c directly) and W_UV into the output, so it is one
    multi-query attention over the cached (c, k_r) with no per-head K/V (the absorbed form). Both scale scores by
    1/sqrt(qk_nope_head_dim + qk_rope_head_dim). Parameter names are DeepSeek's (and Hugging Face's)."""

    def __init__(self, cfg, kind, kv_group, attn_impl="sdpa"):
        super().__init__()
        self.cfg, self.kv_group, self.produces_kv, self.attn_impl = cfg, kv_group, True, attn_impl
        self.window = cfg.local_window if kind == "L" else None
        d, H, r = cfg.n_embd, cfg.n_head, cfg.kv_lora_rank
        nope, rope, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        if attn_impl == "triton":  # the kernel takes one width for q, k and v (a decode step always runs on SDPA)
            from nanokernels.attention import SUPPORTED_HEAD_DIMS
            if not (nope + rope == dv and dv in SUPPORTED_HEAD_DIMS):
                raise ValueError(f"attn_impl='triton' with MLA needs equal query/key and value widths in "
                                 f"{SUPPORTED_HEAD_DIMS}, got qk_nope_head_dim + qk_rope_head_dim = "
                                 f"{nope + rope} and v_head_dim = {dv}: use attn_impl='sdpa' or change the widths")
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, MLA_LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * (nope + rope), bias=False)
        else:
            self.q_proj = nn.Linear(d, H * (nope + rope), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, r + rope, bias=False)  # the latent, then the rope key
        self.kv_a_layernorm = RMSNorm(r, MLA_LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(r, H * (nope + dv), bias=False)    # per head: W_UK rows, then W_UV rows
        self.o_proj = nn.Linear(H * dv, d, bias=False)

    def forward(self, x, cos, sin, kv, cache, ve=None):
        """Returns (output, kv) like Attention; kv = (latent, rope key, window), each (B, 1, T, width)."""
        cfg, (B, T, _) = self.cfg, x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if cfg.q_lora_rank else self.q_proj(x)
        q_nope, q_rope = q.view(B, T, cfg.n_head, -1).transpose(1, 2).split(
            [cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)
        latent, k_rope = self.kv_a_proj_with_mqa(x).unsqueeze(1).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim],
                                                                      dim=-1)
        latent, k_rope = self.kv_a_layernorm(latent), apply_rope(k_rope, cos, sin)
        window = self.window
        if cache is not None:  # the cache holds the latent and the rope key in place of K and V
            latent, k_rope, window = cache.update(self.kv_group, latent, k_rope, window)
        if cache is not None and T == 1 and window is None:  # one query that sees every cached position
            y = self.absorbed(q_nope, q_rope, latent, k_rope)
        else:
            y = self.expanded(q_nope, q_rope, latent, k_rope, window)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), (latent, k_rope, window)

    def up_projections(self, dtype):
        """W_UK (H, qk_nope_head_dim, r) and W_UV (H, v_head_dim, r), views of kv_b_proj's weight."""
        cfg = self.cfg
        w = self.kv_b_proj.weight.to(dtype).view(cfg.n_head, cfg.qk_nope_head_dim + cfg.v_head_dim, -1)
        return w.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=1)

    def expanded(self, q_nope, q_rope, latent, k_rope, window):
        """Per-head keys and values from the latent, then ordinary attention: (B, H, T, v_head_dim)."""
        cfg, (B, _, S, _) = self.cfg, latent.shape
        k_nope, v = self.kv_b_proj(latent[:, 0]).view(B, S, cfg.n_head, -1).transpose(1, 2).split(
            [cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        k = torch.cat((k_nope, k_rope.expand(-1, cfg.n_head, -1, -1)), dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)
        dropout = cfg.dropout if self.training else 0.0
        return attend(q, k, v, window, self.attn_impl, dropout)

    def absorbed(self, q_nope, q_rope, latent, k_rope):
        """One decode step over every cached position, never forming per-head K or V: scores
        (q_nope W_UK) . c + q_rope . k_r against the cached latents c and rope keys k_r (B, 1, S, .), shared by every
        head, then (weights . c) W_UV^T; (B, H, 1, v_head_dim). Softmax in at least fp32."""
        w_uk, w_uv = self.up_projections(q_nope.dtype)
        q_latent = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)
        scores = (q_latent @ latent.transpose(-1, -2) + q_rope @ k_rope.transpose(-1, -2)) / math.sqrt(
            self.cfg.qk_nope_head_dim + self.cfg.qk_rope_head_dim)
        weights = scores.to(torch.promote_types(scores.dtype, torch.float32)).softmax(-1).to(latent.dtype)
        return torch.einsum("bhtr,hvr->bhtv", weights @ latent, w_uv)


class MLP(nn.Module):
    def __init__(self, cfg, hidden):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.up_proj = nn.Linear(cfg.n_embd, hidden, bias=False)
        self.gate_proj = nn.Linear(cfg.n_embd, hidden, bias=False) if self.swiglu else None
        self.down_proj = nn.Linear(hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        """(output, None): the same contract as MoE, which also returns its balance loss."""
        h = (F.silu(self.gate_proj(x)) * self.up_proj(x) if self.swiglu
             else F.relu(self.up_proj(x)).square())
        return self.down_proj(h), None


class MoE(nn.Module):
    """DeepSeek-V3 mixture-of-experts: sigmoid router, top-k chosen with a selection-only bias,
    gates normalised over the chosen experts, shared always-on experts, auxiliary-loss-free
    balancing, no token dropping."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        E, d, h = cfg.n_expert, cfg.n_embd, cfg.expert_hidden
        self.router = nn.Linear(d, E, bias=False)
        n_up = 2 if cfg.mlp == "swiglu" else 1
        # expert weights stacked in nn.Linear layout (out, in): gate and up rows together for swiglu
        self.w_up = nn.Parameter(torch.empty(E, n_up * h, d))
        self.w_down = nn.Parameter(torch.empty(E, d, h))
        nn.init.normal_(self.w_up, std=0.02)
        nn.init.normal_(self.w_down, std=0.02)
        self.shared = MLP(cfg, cfg.n_shared_expert * h) if cfg.n_shared_expert else None
        # selection-only bias, updated by update_bias()
        self.register_buffer("bias", torch.zeros(E))
        # tokens routed per expert since the last bias update: a running count, so gradient
        # accumulation and checkpoint recomputes need no plumbing (a recompute counts twice; the
        # sign update does not change)
        self.register_buffer("load", torch.zeros(E), persistent=False)
        # set by model.convert_fp8(): runs experts in fp8
        self.fp8_linear = None
        # every expert on every token: static shapes, for XLA (set by parallel.py)
        self.dense_dispatch = False
        self.hook = None  # interpretability hook points (nanogpt/interp.py)

    def forward(self, x):
        """(output, balance loss: a scalar tensor while training with moe_aux_alpha > 0,
        else None)."""
        B, T, d = x.shape
        tokens = x.reshape(-1, d)
        scores = torch.sigmoid(
            self.router(tokens).to(torch.promote_types(x.dtype, torch.float32)))  # (N, E)
        if self.hook is not None:
            scores = self.hook("router_scores", scores.view(B, T, -1)).flatten(0, 1)
        chosen = torch.topk(scores + self.bias, self.cfg.n_expert_active, dim=-1).indices
        if self.hook is not None:
            chosen = self.hook("chosen", chosen.view(B, T, -1)).flatten(0, 1)
        gates = scores.gather(1, chosen)
        gates = gates / gates.sum(-1, keepdim=True)
        aux_loss = None
        if self.training:
            # static shape
            self.load += F.one_hot(chosen, self.cfg.n_expert).sum((0, 1)).to(self.load.dtype)
            aux_loss = self.balance_loss(scores.view(B, T, -1), chosen.view(B, T, -1))
        if self.dense_dispatch:
            out = self.run_experts_dense(tokens, chosen, gates.to(x.dtype))
        else:
            out = self.run_experts(tokens, chosen, gates.to(x.dtype))
        if self.hook is not None:  # the routed experts' gated sum, before the shared experts
            out = self.hook("experts", out.view(B, T, d)).flatten(0, 1)
        if self.shared is not None:
            out = out + self.shared(tokens)[0]
        return out.view(B, T, d), aux_loss

    def run_experts(self, tokens, chosen, gates):
        """Sort (token, expert) pairs by expert; run each expert on its contiguous slice;
        scatter-add back."""
        k = chosen.size(1)
        order = chosen.flatten().argsort(stable=True)
        token_of = order // k
        counts = torch.bincount(chosen.flatten(), minlength=self.cfg.n_expert)
        xs = tokens[token_of]
        if self.use_grouped_mm(xs):
            offsets = counts.cumsum(0).to(torch.int32)
            h = torch._grouped_mm(xs, self.w_up.transpose(1, 2), offs=offsets)
            ys = torch._grouped_mm(self.activation(h), self.w_down.transpose(1, 2), offs=offsets)
        else:
            ys = torch.cat([self.expert(e, chunk)
                            for e, chunk in enumerate(xs.split(counts.tolist()))])
        ys = ys * gates.flatten()[order, None]
        return torch.zeros_like(tokens).index_add_(0, token_of, ys.to(tokens.dtype))

    def run_experts_dense(self, tokens, chosen, gates):
        """Shape-static dispatch: E times the expert FLOPs, fine for the small MoE configs
        run on XLA."""
        weights = torch.zeros(tokens.size(0), self.cfg.n_expert, dtype=gates.dtype,
                              device=tokens.device)
        weights = weights.scatter(1, chosen, gates)                                   # (N, E)
        h = self.activation(torch.einsum("nd,ehd->enh", tokens, self.w_up.to(tokens.dtype)))
        ys = torch.einsum("enh,edh->end", h, self.w_down.to(tokens.dtype))
        return torch.einsum("end,ne->nd", ys, weights)

    def use_grouped_mm(self, xs):
        aligned = all(n % 8 == 0
                      for n in (self.w_up.size(1), self.w_down.size(1), self.w_down.size(2)))
        return (hasattr(torch, "_grouped_mm") and xs.is_cuda and xs.dtype == torch.bfloat16
                and aligned and self.fp8_linear is None)

    def expert(self, e, x):
        if self.fp8_linear is not None:  # fp8 quantizes the fp32 master weights itself
            return self.fp8_linear(self.activation(self.fp8_linear(x, self.w_up[e])),
                                   self.w_down[e])
        return F.linear(self.activation(F.linear(x, self.w_up[e].to(x.dtype))),
                        self.w_down[e].to(x.dtype))

    def activation(self, h):
        if self.cfg.mlp == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return F.relu(h).square()

    def balance_loss(self, scores, chosen):
        """DeepSeek-V3 sequence-wise balance loss: alpha * sum_i f_i * P_i per sequence, averaged
        over sequences."""
        if not self.cfg.moe_aux_alpha:
            return None
        E, k, T = self.cfg.n_expert, self.cfg.n_expert_active, scores.size(1)
        hits = torch.zeros_like(scores).scatter_(2, chosen, 1.0)                   # (B, T, E)
        f = hits.sum(1) * E / (k * T)
        p = (scores / scores.sum(-1, keepdim=True)).mean(1)
        return self.cfg.moe_aux_alpha * (f * p).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self, load):
        """bias_i -= gamma * sign(load_i - mean load) for the step's load (summed over ranks);
        restarts the count."""
        self.bias -= self.cfg.moe_bias_gamma * torch.sign(load - load.mean())  # no load: no change
        self.load.zero_()


class ProductKeyMemory(nn.Module):
    """Product-key memory (Lample et al. 2019), as Memory+ in "Memory Layers at Scale" (Berges et
    al. 2024): per head, a query's two halves each score their own memory_keys sub-keys; the k best
    of each half give k x k candidate slots scored by the sum of their halves' scores; the k best
    of those (exactly the k best of all memory_keys^2 slots) are read from the value table, weighted
    by the softmax of their scores, summed over heads. Queries and keys are RMS-normalised (the
    paper's query/key normalisation; no batch norm). Memory+ gates the read like a SwiGLU's up
    projection and projects it: out = W_out(read * silu(W_gate x))."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        H, n, dk = cfg.memory_heads, cfg.memory_keys, cfg.memory_key_dim
        self.query = nn.Linear(cfg.n_embd, H * dk, bias=False)
        self.sub_keys = nn.Parameter(torch.empty(H, 2, n, dk // 2))  # (head, half, key, half width)
        # dense gradients (AdamW's "memory" group in nanogpt/optim.py, never Muon)
        self.values = nn.EmbeddingBag(n * n, cfg.n_embd, mode="sum")
        self.gate = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False) if cfg.memory_gated else None
        self.out_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False) if cfg.memory_gated else None

    def lookup(self, tokens):
        """(slots (N, heads, k), weights (N, heads, k)) for tokens (N, n_embd)."""
        cfg = self.cfg
        H, n, k, dk = cfg.memory_heads, cfg.memory_keys, cfg.memory_topk, cfg.memory_key_dim
        q = self.query(tokens).view(-1, H, 2, dk // 2)
        q, keys = F.rms_norm(q, (dk // 2,)), F.rms_norm(self.sub_keys, (dk // 2,))
        scores = torch.einsum("nhcd,hckd->nhck", q, keys.to(q.dtype))              # (N, H, 2, n)
        best, index = scores.topk(k, dim=-1)                                        # (N, H, 2, k)
        pairs = best[:, :, 0, :, None] + best[:, :, 1, None, :]                     # (N, H, k, k)
        top, flat = pairs.flatten(2).topk(k, dim=-1)                                # (N, H, k)
        slots = index[:, :, 0].gather(2, flat // k) * n + index[:, :, 1].gather(2, flat % k)
        return slots, top.to(torch.promote_types(top.dtype, torch.float32)).softmax(-1)

    def forward(self, x):
        """(output, None): the MLP's contract."""
        B, T, d = x.shape
        tokens = x.reshape(-1, d)
        slots, weights = self.lookup(tokens)
        weights = weights.flatten(1).to(self.values.weight.dtype)
        read = self.values(slots.flatten(1), per_sample_weights=weights).to(x.dtype)
        if self.gate is not None:
            read = self.out_proj(read * F.silu(self.gate(tokens)))
        return read.view(B, T, d), None


class Block(nn.Module):
    def __init__(self, cfg, layer, kind, kv_group, produces_kv, attn_impl="sdpa"):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = (MLA(cfg, kind, kv_group, attn_impl) if cfg.mla else
                     Attention(cfg, kind, kv_group, produces_kv, attn_impl, layer in value_embed_plan(cfg)))
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        if layer in cfg.memory_layers:
            self.mlp = ProductKeyMemory(cfg)
        elif cfg.n_expert and layer >= cfg.n_dense_layers:
            self.mlp = MoE(cfg)
        else:
            self.mlp = MLP(cfg, cfg.hidden)
        self.dropout = nn.Dropout(cfg.dropout)
        # activation checkpointing: keep only the input, recompute the rest in backward
        self.checkpoint = False
        self.hook = None  # interpretability hook points (nanogpt/interp.py)

    def forward(self, x, cos, sin, kv=None, cache=None, ve=None):
        """Returns (x, kv, the MoE balance loss or None). K/V travel as arguments and results, not
        in a shared dict: FSDP copies containers."""
        if self.checkpoint and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, cos, sin, kv, cache, ve,
                                                     use_reentrant=False)
        return self._forward(x, cos, sin, kv, cache, ve)

    def _forward(self, x, cos, sin, kv, cache, ve):
        hook = self.hook
        if hook is not None:
            x = hook("resid_pre", x)
        h, kv = self.attn(self.attn_norm(x), cos, sin, kv, cache, ve)
        if hook is not None:
            h = hook("attn_out", h)
        x = x + self.dropout(h)
        if hook is not None:
            x = hook("resid_mid", x)
        h, balance = self.mlp(self.mlp_norm(x))
        if hook is not None:
            h = hook("mlp_out", h)
        x = x + self.dropout(h)
        if hook is not None:
            x = hook("resid_post", x)
        return x, kv, balance


class MTPModule(nn.Module):
    """One multi-token-prediction depth k (DeepSeek-V3): from the previous depth's hidden state at
    position i and the embedding of token i + k, one more block predicts token i + k + 1 through the
    shared head."""

    def __init__(self, cfg, depth, attn_impl="sdpa"):
        super().__init__()
        self.hidden_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.embed_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.proj = nn.Linear(2 * cfg.n_embd, cfg.n_embd, bias=False)
        # a global-attention block of its own (layer index past the main stack: no value embedding)
        self.block = Block(cfg, cfg.n_layer + depth - 1, "G", f"mtp{depth}", True, attn_impl)
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)  # before the shared head

    def forward(self, h, embedded, cos, sin):
        """(this depth's hidden states (B, T, n_embd), the MoE balance loss or None) from the
        previous depth's h and the embeddings of the tokens one further ahead (B, T, n_embd)."""
        x = self.proj(torch.cat((self.hidden_norm(h), self.embed_norm(embedded)), dim=-1))
        x, _, balance = self.block(x, cos, sin)
        return x, balance


# ----------------------------------------------------------------------------------------- KV cache

class KVCache:
    """One K/V per sharing group: local groups in a ring of `local_window` slots, global groups for
    the context. The first call is the prefill (up to block_size tokens); later calls add one token
    each."""

    def __init__(self, cfg):
        self.pos, self.block_size, self.k, self.v = 0, cfg.block_size, {}, {}
        self.slots = {kv_group: (min(cfg.local_window, cfg.block_size) if kind == "L"
                                 else cfg.block_size)
                      for kind, kv_group, produces in layer_plan(cfg) if produces}

    def update(self, kv_group, k, v, window):
        """Store new K/V; return (keys, values, window) to attend over."""
        size, T = self.slots[kv_group], k.size(2)
        if self.pos == 0:  # prefill: attend over the prompt itself, keep its last `size` positions
            if T > self.block_size:
                raise ValueError(f"prompt of {T} tokens exceeds block_size {self.block_size}")
            self.k[kv_group] = k.new_zeros(k.shape[:2] + (size, k.size(3)))
            self.v[kv_group] = v.new_zeros(v.shape[:2] + (size, v.size(3)))  # MLA: the rope key
            keep = min(T, size)
            slots = torch.arange(T - keep, T, device=k.device) % size
            self.k[kv_group][:, :, slots] = k[:, :, -keep:]
            self.v[kv_group][:, :, slots] = v[:, :, -keep:]
            return k, v, window
        if T != 1:
            raise ValueError("after the prefill the cache takes one token per step")
        if self.pos >= self.block_size:
            raise ValueError(f"cache is full ({self.block_size} positions): "
                             "start a new one from a cropped context")
        slot = self.pos % size
        self.k[kv_group][:, :, slot] = k[:, :, 0]
        self.v[kv_group][:, :, slot] = v[:, :, 0]
        # ring order does not matter: softmax is permutation-invariant over keys
        n = min(self.pos + 1, size)
        # a decode step's ring holds exactly its window
        return self.k[kv_group][:, :, :n], self.v[kv_group][:, :, :n], None

    @staticmethod
    def bytes_at(cfg, context, dtype_bytes=2):
        """Cache bytes for one sequence at `context` tokens."""
        per_pos = ((cfg.kv_lora_rank + cfg.qk_rope_head_dim) if cfg.mla else 2 * cfg.n_kv_head * cfg.head_dim
                   ) * dtype_bytes
        total = 0
        for kind, _, produces in layer_plan(cfg):
            if produces:
                total += per_pos * min(context, cfg.local_window if kind == "L" else context)
        return total


# -------------------------------------------------------------------------------------- output head

# logits per loss chunk (128 MiB in fp32): rows per chunk = this // vocab_size
LOSS_CHUNK_ELEMENTS = 2**25


def softcapped(logits, softcap):
    return softcap * torch.tanh(logits / softcap) if softcap else logits


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of x @ weight.T against targets (-1: ignored), never holding more than
    one chunk of rows' logits. Each chunk's logits give its loss and at once its gradients for x and
    weight (a sum's gradient only needs scaling in backward), so nothing is recomputed. Matmuls run
    in the autocast dtype, softmax in fp32."""

    @staticmethod
    def forward(ctx, x, weight, targets, softcap, chunk_rows):
        device = x.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        # acc: fp32, or fp64 in tests
        w, acc = weight.to(compute), torch.promote_types(compute, torch.float32)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_x = torch.empty_like(x) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_grad else None
        loss = torch.zeros((), dtype=acc, device=x.device)
        for start in range(0, x.size(0), chunk_rows):
            xc, tc = x[start:start + chunk_rows].to(compute), targets[start:start + chunk_rows]
            logits = softcapped((xc @ w.t()).to(acc), softcap)
            lse = logits.logsumexp(-1)
            counted = (tc >= 0).to(acc)
            picked = logits.gather(1, tc.clamp(min=0)[:, None])[:, 0]
            loss += ((lse - picked) * counted).sum()
            # d loss / d logits = softmax - one_hot, on counted rows; through the cap:
            # * (1 - tanh^2)
            if need_grad:
                d = (logits - lse[:, None]).exp_()
                d.scatter_add_(1, tc.clamp(min=0)[:, None], -torch.ones_like(d[:, :1]))
                d *= counted[:, None]
                if softcap:
                    d *= 1 - (logits / softcap) ** 2
                d = d.to(compute)
                grad_x[start:start + chunk_rows] = (d @ w).to(x.dtype)
                grad_w += (d.t() @ xc).to(acc)
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        gx = grad_x * grad_loss.to(grad_x.dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_w * grad_loss).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gx, gw, None, None, None


class LMHead(nn.Linear):
    """The output projection. Given targets it returns the summed loss without the (rows, vocab)
    logits (ChunkedCrossEntropy), or with per_token the cross-entropy of each row, differentiable,
    from chunks whose logits are recomputed in backward (DPO). Every use goes through the module
    call, so FSDP2 gathers the weight."""

    def forward(self, x, targets=None, softcap=0.0, per_token=False):
        if targets is None:
            logits = super().forward(x)
            return softcapped(logits.to(torch.promote_types(logits.dtype, torch.float32)), softcap)
        chunk_rows = max(1, LOSS_CHUNK_ELEMENTS // self.out_features)
        if not per_token:
            return ChunkedCrossEntropy.apply(x, self.weight, targets, softcap, chunk_rows)

        def chunk_losses(xc, tc):
            logits = F.linear(xc, self.weight)
            logits = softcapped(logits.to(torch.promote_types(logits.dtype, torch.float32)),
                                softcap)
            return F.cross_entropy(logits, tc, ignore_index=-1, reduction="none")
        checkpointed = functools.partial(torch.utils.checkpoint.checkpoint, chunk_losses,
                                         use_reentrant=False)
        run = checkpointed if torch.is_grad_enabled() else chunk_losses
        return torch.cat([run(x[i:i + chunk_rows], targets[i:i + chunk_rows])
                          for i in range(0, len(x), chunk_rows)])


# -------------------------------------------------------------------------------------------- model

class GPT(nn.Module):
    def __init__(self, cfg, attn_impl="sdpa"):
        """attn_impl: 'sdpa' (PyTorch) or 'triton' (nanokernels/attention.py); a runtime choice,
        not saved with cfg."""
        super().__init__()
        if attn_impl not in ("sdpa", "triton"):
            raise ValueError(f"attn_impl must be 'sdpa' or 'triton', got {attn_impl!r}")
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.value_embeds = nn.ModuleList(nn.Embedding(cfg.vocab_size, cfg.n_kv_head * cfg.head_dim)
                                          for _ in range(cfg.value_embeds))
        self.blocks = nn.ModuleList(Block(cfg, i, *spec, attn_impl)
                                    for i, spec in enumerate(layer_plan(cfg)))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = LMHead(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.init_weights()
        # built and drawn after the rest: the main weights start the same with or without MTP
        self.mtp = nn.ModuleList(MTPModule(cfg, k, attn_impl) for k in range(1, cfg.mtp_depth + 1))
        self.mtp.apply(self._init_weights)

    def init_weights(self):
        """(Re)initialise every parameter and buffer: also how a model built on the meta device is
        materialised."""
        self.apply(self._init_weights)

    def _init_weights(self, module):
        std = 0.02
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        if isinstance(module, ProductKeyMemory):
            nn.init.normal_(module.sub_keys)  # unit-RMS keys, as after their normalisation
            # Lample et al.'s value init
            nn.init.normal_(module.values.weight, std=module.cfg.n_embd ** -0.5)
        if isinstance(module, Attention) and hasattr(module, "ve_mix"):
            nn.init.constant_(module.ve_mix, 0.5)
        writer_std = 0.0 if self.config.zero_init_proj else std / math.sqrt(2 * self.config.n_layer)
        if isinstance(module, MoE):
            nn.init.normal_(module.w_up, std=std)
            nn.init.normal_(module.w_down, std=writer_std)
            module.bias.zero_()
            module.load.zero_()
        # residual-stream writers: GPT-2's 1/sqrt(2·layers) scaling
        for name in ("o_proj", "down_proj", "out_proj"):
            if hasattr(module, name):
                nn.init.normal_(getattr(module, name).weight, std=writer_std)

    def forward(self, idx, targets=None, cache=None, per_token=False, mtp=False, with_balance=False):
        """Two paths.
        Loss (targets given; -1 marks a position without a loss): returns (ce, balance). ce is the
        cross-entropy summed over the counted targets, or per position (B, T) with per_token (0
        where not counted); the logits are never held whole. balance is the MoE balance loss at
        strength moe_aux_alpha, summed over the MoE layers (a scalar; 0 outside training or without
        it); the objective adds it, once per batch.
        With mtp (and mtp_depth > 0) the loss path returns (ce, balance, mtp_ce): mtp_ce
        (mtp_depth,) holds each MTP depth's cross-entropy summed over its counted targets (depth k:
        targets[:, k:]), and balance includes the MTP blocks'.
        States (no targets): returns the final-norm hidden states (B, T, n_embd); logits(h) applies
        the head. With mtp, (states, the last block's output): the MTP modules' input. With
        with_balance, (that, balance): a loss of the caller's own on the states (distillation).
        With a cache, idx continues the cached context and cache.pos advances."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if cache is None and start + T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        cos, sin = rope_tables(start, T, self.config.rope_dim, self.config.rope_theta, idx.device)
        # shared_kv: each sharing group's K/V, from its producer layer
        x, shared_kv = self.wte(idx), {}
        balance = torch.zeros((), device=idx.device)
        value_embeds = [table(idx) for table in self.value_embeds]
        ve_of = value_embed_plan(self.config)
        for i, block in enumerate(self.blocks):
            kv_group, ve = block.attn.kv_group, value_embeds[ve_of[i]] if i in ve_of else None
            x, shared_kv[kv_group], layer_balance = block(x, cos, sin, shared_kv.get(kv_group),
                                                          cache, ve)
            if layer_balance is not None:
                balance = balance + layer_balance
        last = x  # the last block's output, where MTP starts
        x = self.norm(x)
        if cache is not None:
            cache.pos += T
        if targets is None:
            states = (x, last) if mtp else x
            return (states, balance) if with_balance else states
        ce = self.lm_head(x.flatten(0, 1), targets.flatten(), self.config.logit_softcap, per_token)
        if mtp and self.mtp:
            mtp_ce, mtp_balance = self.mtp_losses(last, idx, targets, cos, sin)
            return ce, balance + mtp_balance, mtp_ce
        return (ce.view(B, T) if per_token else ce), balance

    def mtp_states(self, last, idx, cos, sin, depths=None):
        """Yield (depth k, its hidden states (B, T - k, n_embd) after its final norm, its balance
        loss or None): position i of depth k sees the main model up to token i and tokens
        i+1..i+k, and predicts token i+k+1."""
        h = last
        for k, module in enumerate(self.mtp[:depths], start=1):
            n = idx.size(1) - k
            h, balance = module(h[:, :n], self.wte(idx[:, k:]), cos[:n], sin[:n])
            yield k, module.norm(h), balance

    def mtp_losses(self, last, idx, targets, cos, sin):
        """((mtp_depth,) summed cross-entropies, their MoE balance loss) of the MTP depths."""
        losses, balance = [], torch.zeros((), device=idx.device)
        for k, h, layer_balance in self.mtp_states(last, idx, cos, sin):
            losses.append(self.lm_head(h.flatten(0, 1), targets[:, k:].flatten(),
                                       self.config.logit_softcap))
            if layer_balance is not None:
                balance = balance + layer_balance
        return torch.stack(losses), balance

    def logits(self, h):
        """The output head (and the softcap) on hidden states (..., n_embd), in at least fp32."""
        return self.lm_head(h, softcap=self.config.logit_softcap)

    # ------------------------------------------------------------------------------------- counting

    def num_params(self, active=False):
        """Parameters excluding the input and value embeddings (lookups, not matmuls); active: only
        the top-k share of the routed experts."""
        n = (sum(p.numel() for p in self.parameters())
             - sum(p.numel() for p in self.value_embeds.parameters()))
        if not self.config.tie_embeddings:
            n -= self.wte.weight.numel()
        if active:
            for block in [*self.blocks, *(m.block for m in self.mtp)]:
                if isinstance(block.mlp, MoE):
                    routed = block.mlp.w_up.numel() + block.mlp.w_down.numel()
                    n -= routed - routed * self.config.n_expert_active // self.config.n_expert
                if isinstance(block.mlp, ProductKeyMemory):  # a token reads heads x topk value rows
                    read = self.config.memory_heads * self.config.memory_topk * self.config.n_embd
                    n -= block.mlp.values.weight.numel() - read
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward): 6·active matmul params + attention over
        visible keys; with MTP, its blocks' attention and its use of the head, once per depth."""
        cfg = self.config
        attn = 0
        for kind in [kind for kind, _, _ in layer_plan(cfg)] + ["G"] * cfg.mtp_depth:
            # keys per query
            visible = visible_pairs(seq_len, cfg.local_window if kind == "L" else None) / seq_len
            # QK^T and AV, 2 FLOPs per multiply-add, x3 for forward + backward (MLA trains expanded)
            qk, v = ((cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim) if cfg.mla
                     else (cfg.head_dim, cfg.head_dim))
            attn += 6 * cfg.n_head * (qk + v) * visible
        head_reuse = cfg.mtp_depth * self.lm_head.weight.numel()
        return 6 * (self.num_params(active=True) + head_reuse) + attn

    def convert_fp8(self, recipe="tensorwise"):
        """Run the attention projections, MLPs and experts in fp8 (nanokernels/fp8.py). The
        embedding, lm_head, router and norms stay in higher precision, as in DeepSeek-V3. Returns
        the layers left alone for their dims."""
        from nanokernels.fp8 import convert_to_fp8, fp8_linear, fp8_supported
        skipped = convert_to_fp8(self.blocks, recipe,
                                 filter_fn=lambda layer, name: not name.endswith("router"))
        for i, block in enumerate(self.blocks):
            if isinstance(block.mlp, MoE):
                if fp8_supported(self.config.n_embd, self.config.expert_hidden):
                    block.mlp.fp8_linear = functools.partial(fp8_linear, recipe=recipe)
                else:
                    skipped.append(f"blocks.{i}.mlp.experts")
        return skipped

    def moe_layers(self):
        blocks = [*self.blocks, *(m.block for m in self.mtp)]
        return [b.mlp for b in blocks if isinstance(b.mlp, MoE)]

    def expert_loads(self):
        """(MoE layers, experts): tokens routed to each expert since the last bias update; None for
        a dense model. Under data parallelism the caller sums them over ranks before
        update_expert_biases."""
        moe_layers = self.moe_layers()
        return torch.stack([m.load for m in moe_layers]) if moe_layers else None

    @torch.no_grad()
    def update_expert_biases(self, loads):
        """Aux-loss-free balancing, once after each optimizer step: each expert's load moves its
        selection bias. Returns the mean over MoE layers of max/mean expert load (a tensor, read at
        log intervals only)."""
        for m, load in zip(self.moe_layers(), loads):
            m.update_bias(load)
        return (loads.max(1).values / loads.mean(1).clamp(min=1)).mean()

    # ----------------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate_tokens(self, idx, max_new_tokens, sample=None, vocab_limit=None):
        """Yield the next tokens (B, 1) after idx (B, T), one step at a time, with the KV cache. Past
        block_size the cache is rebuilt from the last 3/4 block of the context. sample: (logits
        (B, V), each row's tokens generated so far) -> (B,) next tokens (nanogpt/sampling.py's
        sampler() makes one from any sampling settings); None: greedy. vocab_limit: ids from here
        on (a padded vocabulary's spare rows) are never sampled."""
        block, cache, generated = self.config.block_size, None, [[] for _ in range(idx.size(0))]
        for _ in range(max_new_tokens):
            if cache is None or cache.pos >= block:
                keep = block if cache is None else block * 3 // 4
                cache = KVCache(self.config)
                h = self(idx[:, max(0, idx.size(1) - keep):], cache=cache)  # XLA: no start < 0
            else:
                h = self(idx[:, -1:], cache=cache)
            logits = self.logits(h[:, -1])
            if vocab_limit is not None:
                logits[:, vocab_limit:] = float("-inf")
            token = (logits.argmax(-1) if sample is None else sample(logits, generated))[:, None]
            for row, t in zip(generated, token[:, 0].tolist()):
                row.append(t)
            idx = torch.cat((idx, token), dim=1)
            yield token

    @torch.no_grad()
    def mtp_drafts(self, last, tokens):
        """Greedy guesses (1, mtp_depth) of the tokens after `tokens` (1, T), given the main model's
        last-block output for tokens[:, :-1] (1, T - 1, n_embd). Depth k at position i reads token
        i + k: here the tokens themselves, then the guesses so far."""
        n = tokens.size(1) - 1
        cos, sin = rope_tables(0, n, self.config.rope_dim, self.config.rope_theta, tokens.device)
        h, seq = last, tokens
        for module in self.mtp:
            h, _ = module(h, self.wte(seq[:, -n:]), cos, sin)
            guess = self.logits(module.norm(h[:, -1])).argmax(-1, keepdim=True)
            seq = torch.cat((seq, guess), dim=1)
        return seq[:, tokens.size(1):]

    @torch.no_grad()
    def generate_speculative(self, idx, max_new_tokens, vocab_limit=None):
        """Greedy decoding of one sequence idx (1, T), self-speculative (the MTP modules draft, the
        model verifies): yield (the tokens (1, n) accepted this step, (drafts accepted, proposed)).
        Each step is one forward, without a KV cache, over the context generate_tokens' cache would
        hold (at most block_size tokens, restarting from the last 3/4 block when full) and the
        drafts that fit: the drafts equal to the model's own greedy choices are kept, plus its next
        token, so the tokens are generate_tokens' greedy ones."""
        if not self.mtp or idx.size(0) != 1:
            raise ValueError("speculative decoding takes one sequence of an MTP model")
        block = self.config.block_size
        drafts, made, start = idx[:, :0], 0, max(0, idx.size(1) - block)
        while made < max_new_tokens:
            if idx.size(1) - start > block:  # generate_tokens rebuilds its full cache here
                start = idx.size(1) - block * 3 // 4
            drafts = drafts[:, :block - (idx.size(1) - start)]  # every query sees its whole context
            seq = torch.cat((idx[:, start:], drafts), dim=1)
            h, last = self(seq, mtp=True)
            n = drafts.size(1)
            logits = self.logits(h[0, -n - 1:])
            if vocab_limit is not None:
                logits[:, vocab_limit:] = float("-inf")
            best = logits.argmax(-1)[None]  # the model's choice after each token
            ok = int((best[0, :n] == drafts[0]).long().cumprod(0).sum())  # drafts agreeing in order
            step = best[:, :ok + 1][:, :max_new_tokens - made]  # the ok drafts and the next token
            yield step, (ok, n)
            idx, made = torch.cat((idx, step), dim=1), made + step.size(1)
            kept = seq.size(1) - n + ok  # seq positions now verified
            drafts = self.mtp_drafts(last[:, :kept],
                                     torch.cat((seq[:, :kept], step[:, -1:]), dim=1))

    def generate(self, idx, max_new_tokens, sample=None, vocab_limit=None):
        """idx (B, T) followed by max_new_tokens tokens (generate_tokens' settings; greedy by default)."""
        return torch.cat([idx, *self.generate_tokens(idx, max_new_tokens, sample, vocab_limit)], dim=1)
