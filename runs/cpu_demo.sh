#!/usr/bin/env bash
# The post-training road on a CPU, end to end (like nanochat's speedrun): prepare the arith task, pretrain a small
# base model on its text, SFT it on worked solutions, RL it from the verifier, and evaluate every stage on the
# held-out test split. Writes into $OUT (default out/cpu_demo): report.md, report.json
# ({"stages": {"base": {"pass@1": ...}, "sft": {...}, "rl": {...}}, ...}) and reward.png (reward over RL steps).
#
#   bash runs/cpu_demo.sh
#   OUT=/tmp/demo bash runs/cpu_demo.sh
#   OUT=/tmp/smoke PREP_ARGS="--n_train 500" BASE_ARGS="--max_iters=2" SFT_ARGS="--max_iters=2" \
#       RL_ARGS="--max_iters=2" EVAL_LIMIT=4 bash runs/cpu_demo.sh                         # a shrunken smoke run
#
# Each stage's wall, user and system seconds (bash's `time`, children included) go into the report, with the
# machine's load average: on a shared machine wall time depends on what else runs.
set -euo pipefail
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0; fi
cd "$(dirname "$0")/.."
OUT=${OUT:-out/cpu_demo}
EVAL_LIMIT=${EVAL_LIMIT:-100}        # test problems evaluated per stage (8 samples each + one greedy)
export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-../shared/tiktoken_cache}
mkdir -p "$OUT"
DATA="$OUT/data"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
source runs/common.sh  # timed STAGE command...: each stage's seconds into $OUT/times.json

timed prepare python data/arith/prepare.py --out_dir "$DATA/arith" --text_dir "$DATA/arith_text" --block_size 64 \
    --overwrite ${PREP_ARGS:-}
timed base python train.py config/base_arith.py --data_root="$DATA" --out_dir="$OUT/base" --overwrite=True \
    ${BASE_ARGS:-}
timed sft python train.py config/sft_arith.py --data_root="$DATA" --out_dir="$OUT/sft" --init_from="$OUT/base" \
    --overwrite=True ${SFT_ARGS:-}
timed rl python train.py config/rl_arith.py --data_root="$DATA" --out_dir="$OUT/rl" --init_from="$OUT/sft" \
    --overwrite=True ${RL_ARGS:-}
for stage in base sft rl; do
    timed "eval_$stage" python eval.py --out_dir="$OUT/$stage" --tasks=arith --data_dir="$DATA/arith" \
        --limit="$EVAL_LIMIT" --max_new_tokens=24 ${EVAL_ARGS:-}
done

LOAD_BEFORE="$LOAD_BEFORE" python - "$OUT" <<'PY'
import json, os, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

out = sys.argv[1]
times = json.load(open(os.path.join(out, "times.json")))  # runs/common.sh's timed
stages = {}
for stage in ("base", "sft", "rl"):
    result = json.load(open(os.path.join(out, stage, "eval.json")))["results"]["arith"]
    stages[stage] = {**result["metrics"], "stderr": result["stderr"], "test_problems": result["n"],
                     "train": times[stage], "eval": times[f"eval_{stage}"]}
rows = [json.loads(line) for line in open(os.path.join(out, "rl", "metrics.jsonl"))]
steps = [r for r in rows if "reward" in r]
evals = [r for r in rows if "val_pass@1" in r]
fig, ax = plt.subplots(figsize=(8, 4.5))
ax.plot([r["iter"] for r in steps], [r["reward"] for r in steps], alpha=0.6, label="mean reward (batch)")
ax.plot([r["iter"] for r in evals], [r["val_pass@1"] for r in evals], "o-", label="pass@1 (val)")
ax.set_xlabel("RL step")
ax.set_ylabel("reward / pass@1")
ax.set_ylim(0, 1)
ax.grid(alpha=0.3)
ax.legend()
ax.set_title(f"RL on arith: SFT {stages['sft']['pass@1']:.3f} -> RL {stages['rl']['pass@1']:.3f} pass@1 (test)")
fig.tight_layout()
fig.savefig(os.path.join(out, "reward.png"))
total = {k: sum(t[k] for t in times.values()) for k in ("wall_s", "cpu_s")}
report = {"stages": stages, "rl_gain_pass@1": stages["rl"]["pass@1"] - stages["sft"]["pass@1"], "total": total,
          "load_average_before": os.environ["LOAD_BEFORE"], "load_average_after": open("/proc/loadavg").read()[:14],
          "cpus": os.cpu_count(), "times": times}
json.dump(report, open(os.path.join(out, "report.json"), "w"), indent=1)
lines = ["# CPU demo: base -> SFT -> RL on arith (held-out test split)", "",
         "| stage | pass@1 | pass@8 | greedy | train wall s | train CPU s | eval wall s |", "|---|---:|---:|---:|---:|---:|---:|"]
for stage, r in stages.items():
    lines.append(f"| {stage} | {r['pass@1']:.3f} | {r['pass@8']:.3f} | {r['greedy']:.3f} | {r['train']['wall_s']:.0f} "
                 f"| {r['train']['cpu_s']:.0f} | {r['eval']['wall_s']:.0f} |")
lines += ["", f"RL adds {100 * report['rl_gain_pass@1']:+.1f} points of pass@1 over SFT "
          f"({stages['rl']['test_problems']} test problems; pass@1 and pass@8 from 8 samples at temperature 1, top-k 20).",
          f"Total: {total['wall_s']:.0f} s wall, {total['cpu_s']:.0f} s CPU (user + system) on {os.cpu_count()} cores; "
          f"load average before {report['load_average_before']}, after {report['load_average_after']}.",
          "", "![reward over RL steps](reward.png)", ""]
open(os.path.join(out, "report.md"), "w").write("\n".join(lines))
print("\n".join(lines))
PY
