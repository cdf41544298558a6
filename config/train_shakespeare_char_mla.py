# The quick run with DeepSeek's multi-head latent attention: each layer caches one 64-wide K/V latent plus one 16-wide
# RoPE key per token (80 numbers) where the quick run's multi-head attention caches 2 x 4 heads x 32 (256). MLA's
# norms are on its latents, so the per-head QK-norm is off (a norm on the keys cannot be absorbed into the query).
# Every other setting is the quick run's.
out_dir = "out-shakespeare-char-mla"
kv_lora_rank = 64
qk_rope_head_dim = 16          # the rope part of each 48-wide query/key head: 32 without RoPE + 16 with
qk_norm = False
