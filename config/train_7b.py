# About 7B parameters (7,140,690,048 with the GPT-2 vocabulary), Character.AI-style for cheap inference:
# multi-query attention, five 1024-token sliding-window layers per global layer, K/V shared by adjacent layer pairs
# and by all global layers; fp8 matmuls, FSDP2, full activation checkpointing, ~4M tokens per optimizer step.
#   python train.py config/train_7b.py --dry_run=True           # memory plan, on any machine, in seconds
#   python train.py config/train_7b.py --batch_size=8           # one GPU (the plan says whether it fits)
#   torchrun --standalone --nproc_per_node=8 train.py config/train_7b.py --batch_size=8
out_dir = "out-7b"
dataset = "fineweb10B"          # any prepared dataset folder under data/
n_layer = 32
n_embd = 4096
n_head = 32                     # head_dim 128
n_kv_head = 1
mlp = "swiglu"
mlp_hidden = 14336
attn_pattern = "LLLLLG"
local_window = 1024
kv_share = 2
share_global_kv = True
block_size = 4096
batch_size = 8                  # sequences per GPU per micro-step
total_batch_size = 4 * 1024 * 1024  # tokens per optimizer step; gradient accumulation fills it
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 2000
max_iters = 20000               # ~84B tokens
optimizer = "adamw"            # the memory plan and README figures are AdamW's; --optimizer=muon halves the state
lr_schedule = "wsd"
weight_decay = 0.1
eval_interval = 500
eval_iters = 50
log_interval = 1
fp8 = True
fp8_recipe = "tensorwise"
fsdp = True
activation_checkpoint = "full"
compile = True
