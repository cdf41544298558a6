# RL from verifiable rewards on GSM8K (nanogpt/rl.py), the GPU recipe: from the SFT checkpoint of config/sft_gsm8k.py
# (a GPT-2-BPE base fine-tuned on GSM8K's worked answers), nanochat's chat_rl shape: 16 samples per question,
# mean-only advantages, token-level loss, strictly on-policy, no KL. Reward: the reply's final '#### N' against the
# reference's. pass@1 / pass@8 on 400 test problems at each evaluation (GSM8K has no val problems file).
#   python data/gsm8k/prepare.py --block_size 512     # writes data/gsm8k/{train,test}.jsonl and the SFT shards
#   python train.py config/rl_gsm8k.py --init_from=out-sft
#   torchrun --standalone --nproc_per_node=8 train.py config/rl_gsm8k.py --init_from=out-sft
#   python train.py config/rl_gsm8k.py --dry_run=True  # parameters, FLOPs and the memory plan
out_dir = "out-rl"
dataset = "gsm8k"              # the SFT shards: their val loss is evaluated beside pass@k
rl_task = "gsm8k"              # prompts and answers: data/gsm8k/train.jsonl, test.jsonl
block_size = 512               # prompt (GSM8K's longest question is about 200 tokens) + rl_max_new_tokens
batch_size = 32                # sequences per training forward (micro-batch)
rl_prompts = 16                # per GPU per step
rl_group_size = 16
rl_temperature = 1.0
rl_top_k = 50
rl_max_new_tokens = 256
rl_loss_type = "token"
rl_scale_rewards = "none"
rl_updates = 1
rl_kl_beta = 0.0
rl_eval_split = "test"
rl_eval_problems = 400
rl_eval_samples = 8
max_iters = 500
eval_interval = 50
eval_iters = 4
log_interval = 1
warmup_iters = 10
optimizer = "adamw"
lr_schedule = "linear"
learning_rate = 1e-5
min_lr = 0.0
weight_decay = 0.0
