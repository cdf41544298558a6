# The CPU demonstration's base model (runs/cpu_demo.sh): a 2-layer GPT-2-BPE model pretrained on the arith task's
# train problems as plain text (data/arith_text: no chat tokens), a few minutes on a 2-core CPU.
#   python data/arith/prepare.py
#   python train.py config/base_arith.py
out_dir = "out-arith-base"
dataset = "arith_text"
block_size = 64                # a problem and its worked solution are about 50 tokens
batch_size = 32
n_layer = 2
n_embd = 64
n_head = 4
max_iters = 80
eval_interval = 80
eval_iters = 4
log_interval = 25
warmup_iters = 10
learning_rate = 4e-3
min_lr = 4e-4
compile = False
