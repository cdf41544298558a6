# The GPT-2-small speedrun: FineWeb val loss 3.28 as fast as possible (the llm.c / modded-nanogpt benchmark;
# records: modded-nanogpt 1.23 min on 8xH100, the llm.c AdamW baseline 45 min).
#   python data/fineweb10B/prepare.py --num_chunks 18                      # ~1.8B train tokens, the modded shards
#   torchrun --standalone --nproc_per_node=8 train.py config/speedrun_gpt2.py
#   python train.py config/speedrun_gpt2.py                               # one GPU: 8x gradient accumulation
# Protocol: val loss over exactly the first 10,485,760 tokens of fineweb_val_000000.bin every eval_interval steps;
# the run stops at the first evaluation at or below 3.28 and prints "reached val loss ... after T s of training
# (eval excluded)". Hyperparameters translate modded-nanogpt's Nov-2024 recipe into this repo's conventions
# (nanogpt/optim.py: Muon's update is scaled to AdamW's RMS, so the base lr below is per-entry update RMS / 0.2).
out_dir = "out-speedrun"
dataset = "fineweb10B"
val_tokens = 10_485_760
target_val_loss = 3.28
eval_interval = 125
log_interval = 25
# GPT-2 small's shape: 12 layers, width 768, 6 heads of 128; GPT-2 BPE padded to 50,304 rows (a multiple of 64)
n_layer = 12
n_embd = 768
n_head = 6
mlp = "relu2"                  # ReLU^2 MLP (Primer, So et al. 2021; modded-nanogpt)
mlp_hidden = 3072
qk_norm = True                 # QK-norm (modded-nanogpt; Dehghani et al. 2023)
logit_softcap = 30.0           # tanh soft-capped logits (Gemma 2; modded-nanogpt's 30)
value_embeds = 3               # value embeddings in the first and last 3 layers (modded-nanogpt, Nov 2024)
zero_init_proj = True          # zero-initialised output projections (modded-nanogpt, after muP)
block_size = 1024
batch_size = 64                # sequences per GPU per micro-step
total_batch_size = 8 * 64 * 1024  # 524,288 tokens per step on any number of GPUs
# optimizer: Muon for the hidden matrices, AdamW for embeddings, head and scalars
optimizer = "muon"
learning_rate = 9e-3           # Muon groups: per-entry update RMS 1.8e-3, modded's lr 0.05 at width 768
lr_scales = {"embedding": 66.7, "lm_head": 0.89, "vectors": 4.4}  # AdamW lrs 0.6, 0.008, 0.04 (modded-nanogpt)
beta1 = 0.8
beta2 = 0.95
weight_decay = 0.0
grad_clip = 0.0
muon_momentum = 0.95
muon_momentum_start = 0.85
muon_momentum_warmup = 300
lr_schedule = "wsd"            # constant, then a linear cooldown to 0 over the last 28% (modded: 900 of 3200)
wsd_decay_frac = 0.28
warmup_iters = 0
min_lr = 0.0
max_iters = 3200
compile = True
