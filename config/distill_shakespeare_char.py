# Distillation (nanogpt/distill.py): a 2-layer, 64-wide student learns the quick-run model's next-character
# distribution along with the data (bench/RESULTS.md, issue 25, measures it against the same student on data alone).
#   python train.py                                        # the teacher: the quick run, into out/
#   python train.py config/distill_shakespeare_char.py
out_dir = "out-distill"
teacher_from = "out"
distill_weight = 0.5           # loss = 0.5 CE + 0.5 T^2 KL(teacher^T || student^T)
distill_temperature = 2.0
n_layer = 2
n_embd = 64
n_head = 4
eval_interval = 280
