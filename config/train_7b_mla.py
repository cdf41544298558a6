# The 7B config with DeepSeek-V3's multi-head latent attention in place of MQA + cross-layer KV sharing: an overlay,
# applied after config/train_7b.py (everything else, the sliding-window pattern included, stays):
#   python train.py config/train_7b.py config/train_7b_mla.py --dry_run=True
# Per layer and token the cache holds a 512-wide latent and a 64-wide RoPE key (1,152 bytes in bf16, 2.25x MQA's).
if n_embd != 4096:  # noqa: F821 (the namespace is train.py's settings)
    raise ValueError("config/train_7b_mla.py is an overlay: put config/train_7b.py before it on the command line")
out_dir = "out-7b-mla"
n_kv_head = 0                  # MLA has no K/V heads to group
kv_share = 1                   # each MLA layer compresses its own K/V (latent sharing is not implemented)
share_global_kv = False
qk_norm = False                # MLA's norms are on its latents
kv_lora_rank = 512             # DeepSeek-V3's shapes at head width 128
q_lora_rank = 1536
qk_nope_head_dim = 128
qk_rope_head_dim = 64
v_head_dim = 128
attn_impl = "sdpa"             # the Triton kernel takes one width for q, k and v; here q/k are 192 wide, v 128
