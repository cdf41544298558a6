"""The evaluation suite: HellaSwag, ARC-Easy and ARC-Challenge, Winogrande, TruthfulQA MC1 and MC2, GSM8K, MMLU
with chain of thought, and bits per byte, each with lm-evaluation-harness's protocol, on one scoring core
(nanogpt/scoring.py). MMLU's 5-shot runner is eval_mmlu.py; its mmlu.json joins the report card.

Tasks: hellaswag, arc_easy, arc_challenge, winogrande, truthfulqa_mc1, truthfulqa_mc2, gsm8k, mmlu_cot, bpb.

    python eval.py --out_dir=out --tasks=hellaswag,arc_challenge,gsm8k
    python eval.py --out_dir=out --tasks=all --limit=200                    # every task (bpb when text_file is set)
    python eval.py --out_dir=out --tasks=bpb --text_file=data/shakespeare    # a dataset's val shards, or a text file

Each task reads its files under their canonical names from data_dir (or data_dir/<task folder>), or downloads them
once into cache_dir. Prints one table; writes out_dir/eval.json (per task: metrics, standard errors, shots,
questions, seconds and one record per question) and out_dir/eval.md, the report card, with MMLU's rows when
out_dir/mmlu.json is there.
"""
import json
import os
from typing import Literal

import requests

from configurator import at_least, configure, require
from nanogpt.checkpoint import results_dir
from nanogpt.download import DownloadError
from nanogpt.runtime import ATTN_IMPLS, DTYPE_SETTINGS
from nanogpt.scoring import load_scorer
from nanogpt.tasks import TASKS
from nanogpt.tasks.common import CACHE_DIR, Settings, mean_and_stderr

out_dir = "out"                # the model: a run folder, ckpt.pt, step_N/ or hf:FOLDER (results go beside it)
tasks = "all"                  # comma list of the tasks above, or 'all'
limit = 0                      # questions per task (bpb: windows); 0 = all
num_fewshot = -1               # shots for every task; -1 = each task's published default (zero-shot tasks stay 0)
batch_size = 16                # sequences per forward pass (right-padded, sorted by length)
data_dir = ""                  # folder with the tasks' files under their canonical names; '' = download into cache_dir
cache_dir = CACHE_DIR          # downloads, one folder per task family (mmlu is eval_mmlu.py's)
text_file = ""                 # bpb: a text file, or a dataset folder holding val_*.bin shards
max_new_tokens = 256           # generation budget per answer (gsm8k, mmlu_cot)
fewshot_seed = 1234            # shots are drawn per question from (seed, question id)
mmlu_split: Literal["val", "test"] = "val"  # mmlu_cot's split (lm-evaluation-harness's is val)
shared_prefix = True           # compute a question's shots and context once for all its choices
device = "auto"                # 'auto' (cuda when there is a GPU, else cpu), 'cpu', 'cuda', 'cuda:N', 'xla'
dtype: Literal[DTYPE_SETTINGS] = "auto"  # 'auto': bfloat16 on CUDA, else float32
attn_impl: Literal[ATTN_IMPLS] = "auto"  # 'auto' (triton on CUDA, sdpa elsewhere)
compile = False                # torch.compile the model (dynamic shapes)

COLUMNS = ("task", "metric", "value", "stderr", "shots", "questions", "seconds")


def task_names(spec):
    """The tasks a --tasks value names ('all': every task, bpb only with a text_file)."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if names == ["all"]:
        return [n for n in TASKS if n != "bpb" or text_file]
    unknown = [n for n in names if n not in TASKS]
    require(names and not unknown, f"unknown tasks {unknown or [spec]}; choose from {', '.join(TASKS)} or 'all'")
    require("bpb" not in names or text_file, "bpb needs --text_file (a text file, or a dataset folder of val shards)")
    return list(dict.fromkeys(names))


def result_rows(result):
    """Report-card rows (task, metric, value, stderr, shots, questions, seconds) of one task's result."""
    return [(result["task"], metric, value, result["stderr"][metric], result["shots"], result["n"], result["seconds"])
            for metric, value in result["metrics"].items()]


def mmlu_rows(path):
    """Report-card rows from eval_mmlu.py's mmlu.json: accuracy (with its standard error), the macro average over
    subjects and the two calibration errors."""
    with open(path) as f:
        r = json.load(f)
    if "questions" in r:
        correct = [int(q["prediction"] == q["gold"]) for q in r["questions"]]
        stderr = mean_and_stderr(correct)[1]
    else:  # written before per-question records: the same formula for 0/1 values
        stderr = (r["accuracy"] * (1 - r["accuracy"]) / (r["n"] - 1)) ** 0.5 if r["n"] > 1 else None
    task, common = f"mmlu ({r['split']})", (r["ntrain"], r["n"], r["wall_s"])
    rows = [(task, "acc", r["accuracy"], stderr, *common), (task, "acc (macro over subjects)", r["macro_accuracy"],
                                                             None, *common)]
    for key in ("ece_10bin", "rms_calibration_error"):
        if key in r:
            rows.append((task, key, r[key], None, *common))
    return rows


def cells(row):
    """A report-card row as text: values to 4 decimals, seconds to 1, '-' for no value."""
    *values, seconds = row
    return [f"{v:.4f}" if isinstance(v, float) else "-" if v is None else str(v) for v in values] + [f"{seconds:.1f}"]


def print_table(rows):
    table = [list(COLUMNS)] + [cells(r) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    for row in table:
        print("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))


def report_card(rows, ckpt, notes):
    lines = [f"# Report card: {out_dir} (iter {ckpt.get('iter_num')}, block_size {ckpt['model_args']['block_size']})",
             "", "| " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * 5]
    lines += ["| " + " | ".join(cells(row)) + " |" for row in rows]
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)  # a reader never sees half a file


def save(results, ckpt, config):
    """Writes eval.json and eval.md beside the model (checkpoint.results_dir) and says where; returns the report
    card's rows."""
    rows = [row for r in results.values() for row in result_rows(r)]
    folder = results_dir(out_dir)
    mmlu_json = os.path.join(folder, "mmlu.json")
    if os.path.exists(mmlu_json):
        rows += mmlu_rows(mmlu_json)
    notes = [f"{name}: {note}" for name, r in results.items() for note in r["notes"]]
    if ckpt.get("tokenizer", {}).get("kind") == "char":
        notes.append("char-level vocabulary: characters outside it are dropped from the prompts")
    write_atomic(os.path.join(folder, "eval.json"), json.dumps(
        {"out_dir": out_dir, "iter_num": ckpt.get("iter_num"), "settings": config, "results": results}, indent=1))
    write_atomic(os.path.join(folder, "eval.md"), report_card(rows, ckpt, notes))
    print(f"wrote {os.path.join(folder, 'eval.json')} and {os.path.join(folder, 'eval.md')}")
    return rows, notes


def main(config):
    names = task_names(tasks)
    try:
        scorer, ckpt = load_scorer(out_dir, device, dtype, attn_impl, compile, batch_size, shared_prefix)
    except (OSError, ValueError, RuntimeError) as e:
        raise SystemExit(str(e))
    settings = Settings(data_dir, cache_dir, limit, num_fewshot, fewshot_seed, max_new_tokens, text_file, mmlu_split)
    results = {}
    for name in names:
        print(f"{name}: running")
        try:
            results[name] = TASKS[name].run(scorer, settings)
        except (OSError, ValueError, RuntimeError, DownloadError, requests.RequestException) as e:
            if results:
                save(results, ckpt, config)  # keep what finished
            raise SystemExit(f"{name}: {e}")
        r = results[name]
        print(f"{name}: {r['n']} questions in {r['seconds']:.1f} s ({r['n'] / r['seconds']:.2f}/s), "
              + ", ".join(f"{m} {v:.4g}" for m, v in r["metrics"].items()))
    rows, notes = save(results, ckpt, config)
    print()
    print_table(rows)
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    config = configure(globals())
    at_least(config, 0, "limit")
    at_least(config, -1, "num_fewshot")
    at_least(config, 1, "batch_size", "max_new_tokens")
    main(config)
