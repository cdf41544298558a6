# The quick run with DeepSeek-V3's multi-token prediction: one MTP module (depth 1) also predicts the token after
# next, its loss added at lambda = 0.3. Dropped at inference; `python sample.py --out_dir=out-shakespeare-char-mtp
# --speculative=True --temperature=0` uses it to draft. Everything else is the quick run's.
out_dir = "out-shakespeare-char-mtp"
mtp_depth = 1
mtp_weight = 0.3
