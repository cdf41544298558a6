# The quick run with DeepSeek-V3-style mixture-of-experts MLPs after the first (dense) layer: 8 routed experts,
# top-2, one shared expert, auxiliary-loss-free balancing (plus a small sequence-wise balance loss).
out_dir = "out-shakespeare-char-moe"
n_expert = 8
n_expert_active = 2
n_shared_expert = 1
moe_hidden = 256
n_dense_layers = 1
# the schedule its README numbers were measured with (the default run before it moved to Muon)
optimizer = "adamw"
max_iters = 500
eval_interval = 125
