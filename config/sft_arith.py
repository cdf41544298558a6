# SFT of the arith base model on the task's conversations (question -> worked solution ending in '#### N'); the chat
# tokens' rows start at the mean embedding (train.py says so). The architecture comes from the checkpoint.
#   python data/arith/prepare.py
#   python train.py config/sft_arith.py --init_from=out-arith-base
out_dir = "out-arith-sft"
dataset = "arith"
block_size = 64                # the rows' length: data/arith/prepare.py --block_size 64 (runs/cpu_demo.sh)
batch_size = 32
max_iters = 120
eval_interval = 120
eval_iters = 4
log_interval = 10
warmup_iters = 5
learning_rate = 3e-3
min_lr = 3e-4
weight_decay = 0.0
compile = False
