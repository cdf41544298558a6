# SFT on GSM8K through LoRA adapters (nanogpt/lora.py), an overlay applied after config/sft_gsm8k.py: the base stays
# frozen, only the rank-16 adapters on every attention and MLP projection train, and ckpt.pt holds just them plus a
# pointer to the base (sample.py, chat.py, the evaluations merge them on load; `python tools/merge.py --method=lora
# --models=out-sft-lora` writes a full model).
#   python data/gsm8k/prepare.py --block_size 256          # or --input ../shared/data/gsm8k/train.jsonl
#   python train.py config/sft_gsm8k.py config/sft_gsm8k_lora.py --init_from=out-base
# For DPO or any other objective add the same lora_* settings after its config. Note: the chat tokens' embedding rows
# start at the mean embedding and stay frozen with the rest of the base.
if dataset != "gsm8k":  # noqa: F821 (the namespace is train.py's settings)
    raise ValueError("config/sft_gsm8k_lora.py is an overlay: put config/sft_gsm8k.py before it on the command line")
out_dir = "out-sft-lora"
lora_rank = 16
lora_alpha = 32.0
lora_dropout = 0.05
lora_targets = "*_proj"        # q, k, v, o and the MLP projections (shared experts included)
