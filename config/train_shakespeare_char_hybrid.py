# The quick run with Character.AI's inference-efficient attention: multi-query, two 32-token sliding-window layers
# per global layer, K/V shared by adjacent layer pairs and by all global layers. 6 layers, but only 3 K/V caches.
out_dir = "out-shakespeare-char-hybrid"
n_layer = 6
n_kv_head = 1
attn_pattern = "LLG"
local_window = 32
kv_share = 2
share_global_kv = True
# the schedule its README numbers were measured with (the default run before it moved to Muon)
optimizer = "adamw"
max_iters = 500
eval_interval = 125
