# Supervised fine-tuning on GSM8K conversations (question -> worked answer ending in "#### N") from a pretrained
# GPT-2-BPE checkpoint; the chat tokens' rows start at the mean embedding (train.py says so). The architecture comes
# from the checkpoint.
#   python data/gsm8k/prepare.py --block_size 256          # or --input ../shared/data/gsm8k/train.jsonl
#   python train.py config/sft_gsm8k.py --init_from=out-base/ckpt.pt
out_dir = "out-sft"
dataset = "gsm8k"
block_size = 256               # the rows' length the data was prepared with
batch_size = 8
max_iters = 300
eval_interval = 100
eval_iters = 8
log_interval = 25
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 20
weight_decay = 0.0
