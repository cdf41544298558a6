# RL from verifiable rewards on the arith task (nanogpt/rl.py), from the SFT checkpoint, on a 2-core CPU: groups of
# 8 completions for 8 prompts a step, token-level loss, mean-and-std advantages, strictly on-policy, no KL
# (nanochat's chat_rl and TRL's GRPOTrainer defaults, scaled down). pass@1 / pass@8 on 50 val problems at each
# evaluation; the test split stays for eval.py --tasks=arith.
#   python train.py config/rl_arith.py --init_from=out-arith-sft
out_dir = "out-arith-rl"
dataset = "arith"              # the SFT shards: their val loss is evaluated beside pass@k
rl_task = "arith"              # prompts and answers: data/arith/{train,val}.jsonl
block_size = 64
batch_size = 64                # sequences per training forward (micro-batch)
rl_prompts = 8
rl_group_size = 8
rl_temperature = 1.0
rl_top_k = 20                  # the 20 likeliest tokens: a tiny model's untrained 50k-token tail makes junk
rl_max_new_tokens = 24
rl_loss_type = "token"
rl_scale_rewards = "group"
rl_updates = 1
rl_kl_beta = 0.0
rl_eval_problems = 50
rl_eval_samples = 8
max_iters = 20
eval_interval = 10
eval_iters = 2
log_interval = 1
warmup_iters = 0
optimizer = "adamw"            # on every matrix: Muon's normalised steps would amplify noisy policy gradients
lr_schedule = "constant"
learning_rate = 1e-4
min_lr = 1e-4
weight_decay = 0.0
compile = False
