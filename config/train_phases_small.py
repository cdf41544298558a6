# The whole data plan at small scale, in one run: pretrain phase 1 (loosely filtered text) -> phase 2 (filtered,
# higher quality, language ID) -> midtraining (chat + task data mixed with text) -> SFT (conversations only). The lr
# schedule spans all four (max_iters = the phases' sum); mixture.json / mixture.png show the shares each phase got.
#   S=../shared/data; RULES=min_chars=20,min_words=5,min_stop_words=none,min_punctuated_lines=none,max_short_lines=none
#   python data/text/prepare.py --input $S/tinyshakespeare/input.txt $S/hh-rlhf/harmless-base-test.jsonl.gz \
#       --text_field chosen --txt_docs paragraph --out_dir data/text_web \
#       --rules $RULES,max_top_2gram=none,max_top_3gram=none,max_top_4gram=none,max_dup_5gram=none,max_dup_10gram=none
#   python data/text/prepare.py --input $S/tinyshakespeare/input.txt $S/hh-rlhf/harmless-base-test.jsonl.gz \
#       --text_field chosen --txt_docs paragraph --languages en --rules min_chars=100,min_words=20 \
#       --out_dir data/text_hq
#   python data/gsm8k/prepare.py --input $S/gsm8k/train.jsonl --block_size 256
#   python train.py config/train_phases_small.py
out_dir = "out-phases"
block_size = 256               # the gsm8k rows' length
batch_size = 8
n_layer = 4
n_embd = 128
n_head = 4
phases = [
    {"name": "pretrain 1", "datasets": {"text_web": 1.0}, "iters": 200},
    {"name": "pretrain 2", "datasets": {"text_hq": 3.0, "text_web": 1.0}, "iters": 100},
    {"name": "midtrain", "datasets": ["text_hq", "gsm8k"], "temperature": 2.0, "tokens": 200_000},  # p ~ n^(1/2)
    {"name": "sft", "datasets": {"gsm8k": 1.0}, "iters": 60},
]
eval_interval = 100
eval_iters = 4
log_interval = 20
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 20
