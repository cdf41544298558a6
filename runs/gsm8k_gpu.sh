#!/usr/bin/env bash
# The GPU counterpart of runs/cpu_demo.sh: GSM8K from a GPT-2-BPE base model. Prepares GSM8K's conversations, SFTs
# the base on its worked solutions (config/sft_gsm8k.py), RLs the SFT model from the '#### N' verifier
# (config/rl_gsm8k.py, on every GPU), and evaluates base, SFT and RL on GSM8K's test split with eval.py. Writes into
# $OUT (default out/gsm8k): report.md and report.json ({"stages": {"base": {"exact_match_strict": ...}, "sft": ...,
# "rl": ...}, "times": ...}).
#
#   BASE=out-speedrun bash runs/gsm8k_gpu.sh          # BASE: any GPT-2-BPE checkpoint this repo loads (a run folder,
#                                                     # a ckpt.pt, or hf:FOLDER of a Hugging Face GPT-2 export)
#   GPUS=8 BASE=... bash runs/gsm8k_gpu.sh            # GPUS: processes per stage (default: the GPUs nvidia-smi lists)
#   GSM8K_INPUT="train.jsonl test.jsonl" ...          # offline: local copies instead of the download
#   SFT_ARGS=... RL_ARGS=... EVAL_ARGS=... EVAL_LIMIT=N  # overrides (tests/test_runs.py shrinks it onto a CPU)
set -euo pipefail
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0; fi
cd "$(dirname "$0")/.."
BASE=${BASE:?set BASE to a GPT-2-BPE checkpoint, e.g. BASE=out-speedrun (config/speedrun_gpt2.py) or hf:FOLDER}
OUT=${OUT:-out/gsm8k}
GPUS=${GPUS:-$(nvidia-smi -L 2> /dev/null | wc -l)}
EVAL_LIMIT=${EVAL_LIMIT:-0}            # test problems per evaluation; 0 = all 1,319
DATA="$OUT/data"
mkdir -p "$OUT"
source runs/common.sh  # timed STAGE command...: each stage's seconds into $OUT/times.json

launch() {  # train.py on GPUS processes (torchrun: DDP) or one
    if [ "${GPUS:-0}" -gt 1 ]; then torchrun --standalone --nproc_per_node="$GPUS" "$@"; else python "$@"; fi
}

# rows of 512 tokens: the RL stage's block (a prompt + 256 new tokens), so SFT trains at 512 too
# shellcheck disable=SC2086  # the *_ARGS and GSM8K_INPUT are word lists
timed prepare python data/gsm8k/prepare.py --out_dir "$DATA/gsm8k" --block_size 512 --overwrite \
    ${GSM8K_INPUT:+--input $GSM8K_INPUT}
# shellcheck disable=SC2086
timed sft launch train.py config/sft_gsm8k.py --data_root="$DATA" --init_from="$BASE" --out_dir="$OUT/sft" \
    --block_size=512 --overwrite=True ${SFT_ARGS:-}
# shellcheck disable=SC2086
timed rl launch train.py config/rl_gsm8k.py --data_root="$DATA" --init_from="$OUT/sft" --out_dir="$OUT/rl" \
    --overwrite=True ${RL_ARGS:-}
for stage in base sft rl; do
    model="$OUT/$stage"
    [ "$stage" = base ] && model="$BASE"
    # shellcheck disable=SC2086
    timed "eval_$stage" python eval.py --out_dir="$model" --tasks=gsm8k --data_dir="$DATA/gsm8k" \
        --limit="$EVAL_LIMIT" ${EVAL_ARGS:-}
done

BASE="$BASE" python - "$OUT" <<'PY'
import json, os, sys

from nanogpt.checkpoint import results_dir  # where eval.py wrote each model's eval.json

out = sys.argv[1]
times = json.load(open(os.path.join(out, "times.json")))  # runs/common.sh's timed
stages = {}
for stage in ("base", "sft", "rl"):
    source = os.environ["BASE"] if stage == "base" else os.path.join(out, stage)
    result = json.load(open(os.path.join(results_dir(source), "eval.json")))["results"]["gsm8k"]
    stages[stage] = {**result["metrics"], "test_problems": result["n"], "eval": times[f"eval_{stage}"],
                     **({"train": times[stage]} if stage in times else {})}
report = {"stages": stages, "times": times}
json.dump(report, open(os.path.join(out, "report.json"), "w"), indent=1)
metrics = [k for k in stages["rl"] if k.startswith("exact_match")]
lines = ["# GSM8K: base -> SFT -> RL (test split)", "",
         "| stage | " + " | ".join(metrics) + " | train wall s | eval wall s |",
         "|---|" + "---:|" * (len(metrics) + 2)]
for stage, r in stages.items():
    train = f"{r['train']['wall_s']:.0f}" if "train" in r else "-"
    lines.append(f"| {stage} | " + " | ".join(f"{r[k]:.4f}" for k in metrics) + f" | {train} | {r['eval']['wall_s']:.0f} |")
lines += ["", f"{stages['rl']['test_problems']} test problems.", ""]
open(os.path.join(out, "report.md"), "w").write("\n".join(lines))
print("\n".join(lines))
PY
