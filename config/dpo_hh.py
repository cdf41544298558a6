# DPO on Anthropic HH-RLHF preference pairs (harmless-base and helpful-base by default) from an SFT checkpoint;
# the frozen reference is that checkpoint. Logs and evaluations report loss, chosen and rejected rewards, margin
# and preference accuracy.
#   python data/hh_rlhf/prepare.py --block_size 256
#   (offline: --input ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz)
#   python train.py config/dpo_hh.py --init_from=out-sft/ckpt.pt
out_dir = "out-dpo"
dataset = "hh_rlhf"
block_size = 256
batch_size = 8                 # preference pairs per micro-step
max_iters = 100
eval_interval = 50
eval_iters = 8
log_interval = 10
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 10
weight_decay = 0.0
dpo_beta = 0.1
