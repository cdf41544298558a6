"""The evaluation suite: HellaSwag, ARC-Easy and ARC-Challenge, Winogrande, TruthfulQA MC1 and MC2, GSM8K, MMLU
with chain of thought, HumanEval (run in nanogpt/sandbox.py), CrowS-Pairs, BBQ, and bits per byte with perplexity,
each with lm-evaluation-harness's (HumanEval: the original release's) protocol, on one scoring core
(nanogpt/scoring.py). MMLU's 5-shot runner is eval_mmlu.py; its mmlu.json joins the report card.

Tasks: hellaswag, arc_easy, arc_challenge, winogrande, truthfulqa_mc1, truthfulqa_mc2, gsm8k, mmlu_cot, humaneval,
crows_pairs, bbq, bpb; and arith (data/arith/prepare.py's held-out test split: pass@1, pass@8, greedy; not part of
'all').

    python eval.py --out_dir=out --tasks=hellaswag,arc_challenge,gsm8k
    python eval.py --out_dir=out --tasks=all --limit=200                    # every task (bpb when text_file is set)
    python eval.py --out_dir=out --tasks=bpb --text_file=data/shakespeare    # a dataset's val shards, or a text file
    python eval.py --out_dir=scored --tasks=humaneval --samples=FILE.jsonl   # score task_id/completion rows, no model

Each task reads its files under their canonical names from data_dir (or data_dir/<task folder>), or downloads them
once into cache_dir. Prints one table; writes eval.json and eval.md beside the model (checkpoint.results_dir).
eval.json keeps the latest result of every task ever run on this checkpoint (metrics, standard errors, shots,
questions, seconds, one record per question, and the date, settings and checkpoint iteration of its run): a run
replaces the tasks it ran and keeps the others. eval.md, the report card, shows them all with MMLU's rows when
mmlu.json is there; a result from another iteration of the checkpoint than the current one is kept and marked (its
iter column, and a note). A damaged eval.json is moved aside to eval.json.damaged with a warning; a damaged
mmlu.json is left out of the card with a warning.
"""
import os
from dataclasses import fields
from datetime import datetime, timezone
from typing import Literal

import requests

from configurator import at_least, configure, require
from nanogpt.checkpoint import results_dir
from nanogpt.download import DownloadError
from nanogpt.files import FileFormatError, check_writable, read_json, write_atomic, write_json
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
text_split: Literal["val", "train"] = "val"  # bpb: the split of a dataset folder's shards
max_new_tokens = 256           # generation budget per answer (gsm8k, mmlu_cot)
fewshot_seed = 1234            # shots are drawn per question from (seed, question id)
mmlu_split: Literal["val", "test"] = "val"  # mmlu_cot's split (lm-evaluation-harness's is val)
samples = ""                   # humaneval: score this JSONL file's task_id/completion rows (no model is loaded)
num_samples = 1                # humaneval: completions per problem (pass@k for k = 1, 10, 100 up to it)
temperature = 0.0              # humaneval: sampling temperature (0 with num_samples=1: greedy pass@1)
sandbox_workers = 0            # humaneval: programs run at a time in the sandbox (0: one per CPU core)
shared_prefix = True           # compute a question's shots and context once for all its choices
device = "auto"                # 'auto' (cuda when there is a GPU, else cpu), 'cpu', 'cuda', 'cuda:N', 'xla'
dtype: Literal[DTYPE_SETTINGS] = "auto"  # 'auto': bfloat16 on CUDA, else float32
attn_impl: Literal[ATTN_IMPLS] = "auto"  # 'auto' = sdpa until the GPU check passes 'triton'
compile = False                # torch.compile the model (dynamic shapes)

COLUMNS = ("task", "metric", "value", "stderr", "shots", "questions", "seconds", "iter", "date")


def task_names(spec):
    """The tasks a --tasks value names ('all': every task, bpb only with a text_file)."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if names == ["all"]:
        return [n for n in TASKS if (n != "bpb" or text_file) and n != "arith"]  # arith: this repo's own task
    unknown = [n for n in names if n not in TASKS]
    require(names and not unknown, f"unknown tasks {unknown or [spec]}; choose from {', '.join(TASKS)} or 'all'")
    require("bpb" not in names or text_file, "bpb needs --text_file (a text file, or a dataset folder of val shards)")
    return list(dict.fromkeys(names))


def result_rows(result):
    """Report-card rows (task, metric, value, stderr, shots, questions, seconds, iter, date) of one task's result."""
    return [(result["task"], metric, value, result["stderr"][metric], result["shots"], result["n"], result["seconds"],
             result.get("iter_num"), result.get("date")) for metric, value in result["metrics"].items()]


def mmlu_rows(path):
    """Report-card rows from eval_mmlu.py's mmlu.json: accuracy (with its standard error), the macro average over
    subjects, macro-F1 over the letters and the two calibration errors."""
    r = read_json(path)
    if "questions" in r:
        correct = [int(q["prediction"] == q["gold"]) for q in r["questions"]]
        stderr = mean_and_stderr(correct)[1]
    else:  # written before per-question records: the same formula for 0/1 values
        stderr = (r["accuracy"] * (1 - r["accuracy"]) / (r["n"] - 1)) ** 0.5 if r["n"] > 1 else None
    task, common = f"mmlu ({r['split']})", (r["ntrain"], r["n"], r["wall_s"], r.get("iter_num"), r.get("date"))
    rows = [(task, "acc", r["accuracy"], stderr, *common), (task, "acc (macro over subjects)", r["macro_accuracy"],
                                                             None, *common)]
    for key in ("macro_f1", "ece_10bin", "rms_calibration_error"):
        if key in r:
            rows.append((task, key, r[key], None, *common))
    return rows


def mmlu_rows_or_warning(path):
    """mmlu_rows, or none when there is no mmlu.json; a damaged one is left out with a warning."""
    if not os.path.exists(path):
        return []
    try:
        return mmlu_rows(path)
    except (FileFormatError, KeyError, TypeError, ZeroDivisionError) as e:
        print(f"warning: {path} is damaged ({e}): the report card leaves MMLU out; rerun eval_mmlu.py")
        return []


def cells(row):
    """A report-card row as text: values to 4 decimals, seconds to 1, '-' for no value."""
    *values, seconds, iter_num, date = row
    text = [f"{v:.4f}" if isinstance(v, float) else "-" if v is None else str(v) for v in values]
    return text + [f"{seconds:.1f}", "-" if iter_num is None else str(iter_num), date or "-"]


def print_table(rows):
    table = [list(COLUMNS)] + [cells(r) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    for row in table:
        print("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))


def report_card(rows, ckpt, notes):
    lines = [f"# Report card: {out_dir} (iter {ckpt.get('iter_num')}, block_size {ckpt['model_args']['block_size']})",
             "", "| " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * (len(COLUMNS) - 2)]
    lines += ["| " + " | ".join(cells(row)) + " |" for row in rows]
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def earlier_results(path):
    """The results eval.json already holds, each with its own iter_num, date and settings (a file written before
    those were per task lends them its own); {} when there is none. A damaged file is moved aside with a warning."""
    if not os.path.exists(path):
        return {}
    try:
        saved = read_json(path)
        results = saved["results"]
        if not all(isinstance(r, dict) and "metrics" in r for r in results.values()):
            raise FileFormatError(f"{path}: a result without metrics")
    except (FileFormatError, KeyError, TypeError, AttributeError) as e:
        os.replace(path, path + ".damaged")
        print(f"warning: {path} is damaged ({e}): moved to {path}.damaged; its results are not in the new one")
        return {}
    defaults = {"iter_num": saved.get("iter_num"), "date": None, "settings": saved.get("settings")}
    return {name: {**defaults, **r} for name, r in results.items()}


def in_task_order(results):
    """Results in the order of TASKS, tasks this eval.py no longer knows last."""
    order = {name: i for i, name in enumerate(TASKS)}
    return dict(sorted(results.items(), key=lambda item: order.get(item[0], len(order))))


def stale_notes(rows, iter_num):
    """A note for each task whose result comes from another iteration of the checkpoint than the current one."""
    task, measured_at = COLUMNS.index("task"), COLUMNS.index("iter")
    stale = dict.fromkeys((row[task], row[measured_at]) for row in rows if row[measured_at] != iter_num)
    return [f"{name}: measured at iter {i}, the checkpoint is now at iter {iter_num}: rerun it to refresh"
            for name, i in stale]


def save(results, ckpt, config):
    """Merges this run's results into eval.json beside the model (checkpoint.results_dir), rewrites eval.md from
    all of them and says where; returns the report card's rows and notes."""
    folder = results_dir(out_dir)
    json_path, card_path = os.path.join(folder, "eval.json"), os.path.join(folder, "eval.md")
    stamp = {"iter_num": ckpt.get("iter_num"), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
             "model": out_dir, "settings": config}
    merged = in_task_order({**earlier_results(json_path), **{name: {**r, **stamp} for name, r in results.items()}})
    rows = [row for r in merged.values() for row in result_rows(r)]
    rows += mmlu_rows_or_warning(os.path.join(folder, "mmlu.json"))
    notes = [f"{name}: {note}" for name, r in merged.items() for note in r["notes"]]
    notes += stale_notes(rows, ckpt.get("iter_num"))
    if ckpt.get("tokenizer", {}).get("kind") == "char":
        notes.append("char-level vocabulary: characters outside it are dropped from the prompts")
    write_json(json_path, {"out_dir": out_dir, "iter_num": ckpt.get("iter_num"), "results": merged})
    write_atomic(card_path, report_card(rows, ckpt, notes))
    print(f"wrote {json_path} and {card_path}")
    return rows, notes


def check_settings(config):
    at_least(config, 0, "limit")
    at_least(config, -1, "num_fewshot")
    at_least(config, 1, "batch_size", "max_new_tokens", "num_samples")
    at_least(config, 0, "temperature", "sandbox_workers")
    require(num_samples == 1 or temperature > 0, "num_samples > 1 needs --temperature > 0 (greedy samples are all "
                                                 "the same)")


def check_results_folder():
    """Stop before any scoring unless eval.json and eval.md can be written beside the model (a missing model
    folder is load_scorer's to report)."""
    folder = results_dir(out_dir)
    if os.path.isdir(folder):
        try:
            check_writable(folder, ("eval.json", "eval.md"))
        except OSError as e:
            raise SystemExit(f"--out_dir={out_dir}: {e}")


def load_scorer_unless_scoring_samples(names):
    """(scorer, checkpoint dict); with --samples and humaneval alone no model is loaded (None, a stand-in dict) and
    the results go into out_dir's results folder (created when missing)."""
    require(not samples or "humaneval" in names, "--samples scores humaneval completions: add humaneval to --tasks")
    if samples and names == ["humaneval"]:
        os.makedirs(results_dir(out_dir), exist_ok=True)
        return None, {"iter_num": None, "model_args": {"block_size": "-"}}
    return load_scorer(out_dir, device, dtype, attn_impl, compile, batch_size, shared_prefix)


def main():
    config = configure(globals())
    check_settings(config)
    names = task_names(tasks)
    check_results_folder()
    try:
        scorer, ckpt = load_scorer_unless_scoring_samples(names)
    except (OSError, ValueError, RuntimeError) as e:
        raise SystemExit(str(e))
    settings = Settings(**{f.name: config[f.name] for f in fields(Settings) if f.name in config})  # same names
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
              + ", ".join(f"{m} {'-' if v is None else f'{v:.4g}'}" for m, v in r["metrics"].items()))
    rows, notes = save(results, ckpt, config)
    print()
    print_table(rows)
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
