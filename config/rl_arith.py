# RL from verifiable rewards on the arith task (nanogpt/rl.py), from the SFT checkpoint, on a 2-core CPU: groups of
# 8 completions for 8 prompts a step, token-level loss, mean-and-std advantages, strictly on-policy, no KL
# (nanochat's chat_rl and TRL's GRPOTrainer defaults, scaled down). pass@1 / pass@8 on 50 val problems at each
# evaluation; the test split stays for eval.py --tasks=arith.
# Only the output norm's 64 gains train (train_only): at this size most of RL's gain is sharpening the policy
# (the SFT model samples pass@1 0.24 at temperature 1 and 0.61 at 0.3, val), and updating all 3.3M weights on 64
# samples a step moved them along noise instead and lost pass@1 at every learning rate tried (bench/RESULTS.md).
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
train_only = r"norm\.weight"   # the output norm's gains (full match: not the blocks' *_norm.weight)
optimizer = "adamw"            # Muon's normalised steps would amplify noisy policy gradients
lr_schedule = "constant"
learning_rate = 0.15           # on 64 gains of about 1.3: tens of steps can double them
min_lr = 0.15
weight_decay = 0.0
compile = False
