"""5-shot MMLU (Hendrycks et al., ICLR 2021) for a checkpoint of this repo, with the protocol of the release's
evaluate.py: the subject's first `ntrain` dev questions as shots (dropped from the end until the prompt fits the
context), then the question ending in "Answer:"; the prediction is whichever of " A", " B", " C", " D" gets the
highest next-token logit.

    python eval_mmlu.py --out_dir=out-x                              # downloads data.tar once into cache_dir
    python eval_mmlu.py --out_dir=out-x --subjects=marketing,virology --limit=50
    python eval_mmlu.py --out_dir=out-x --data_dir=../shared/data/mmlu --split=val

Prints and writes to out_dir/mmlu.json: accuracy per subject, per category (micro over questions, and macro over
subjects) and overall (micro, and macro over subjects), macro-F1 over the four letters, the 10-bin expected
calibration error and the paper's RMS calibration error, the shots actually used, the prompts that had to be
truncated, the throughput, the date and the checkpoint's iteration, and one record per question (id, prediction,
gold, the four letter logits).
"""
import os
import time
from datetime import datetime, timezone
from typing import Literal

import requests
import torch

from configurator import at_least, configure
from nanogpt.checkpoint import results_dir
from nanogpt.download import DownloadError
from nanogpt.files import check_writable, write_json
from nanogpt.runtime import ATTN_IMPLS, DTYPE_SETTINGS
from nanogpt.scoring import load_scorer
from nanogpt.tasks import mmlu
from nanogpt.tasks.mmlu import LETTERS

out_dir = "out"                # the model: a run folder, ckpt.pt, step_N/ or hf:FOLDER (results go beside it)
ntrain = 5                     # shots (the subject's first ntrain dev questions)
split: Literal["test", "val"] = "test"
subjects = ""                  # comma list; '' = every subject the split holds (57 in the release)
data_dir = ""                  # folder with dev/ and test/ (or data/dev, ...); '' = download data_url into cache_dir
cache_dir = os.path.join(os.path.expanduser("~"), ".cache", "nanogpt-kernels", "mmlu")
data_url = mmlu.RELEASE_URL
header: Literal["lm_eval", "release"] = "lm_eval"  # 'lm_eval': one space before the subject; 'release': two
limit = 0                      # questions per subject; 0 = all
batch_size = 16                # prompts per forward pass (right-padded, sorted by length)
shared_prefix = True           # compute a subject's few-shot prefix once (False: every prompt whole, as before)
device = "auto"                # 'auto' (cuda when there is a GPU, else cpu), 'cpu', 'cuda', 'cuda:N', 'xla'
dtype: Literal[DTYPE_SETTINGS] = "auto"  # 'auto': bfloat16 on CUDA, else float32
attn_impl: Literal[ATTN_IMPLS] = "auto"  # 'auto' = sdpa until the GPU check passes 'triton'
compile = False                # torch.compile the model (dynamic shapes)


def select_data():
    """(folder holding dev/, folder of the split, subjects to evaluate) from the config globals."""
    try:
        root = mmlu.data_root(data_dir) if data_dir else mmlu.fetch_release(data_url, cache_dir)
    except DownloadError as e:
        raise SystemExit(f"MMLU data: {e}; or point --data_dir at a folder holding the release's dev/ and test/ "
                         "CSV folders")
    except (OSError, RuntimeError, ValueError, requests.RequestException) as e:
        raise SystemExit(f"MMLU data: {e}")
    split_dir = os.path.join(root, split)
    try:
        names = mmlu.pick_subjects(subjects, mmlu.split_subjects(root, split), split)
    except ValueError as e:
        raise SystemExit(str(e))
    if not names:
        raise SystemExit(f"no {split} CSVs in {split_dir}")
    return root, split_dir, names


def build_items(root, split_dir, names, encode, block_size):
    """One dict per question: id, subject, prompt ids, shots used, truncated, gold letter index."""
    items = []
    for s in names:
        shots = mmlu.read_rows(os.path.join(root, "dev", f"{s}_dev.csv"))[:ntrain]
        for i, row in enumerate(mmlu.read_rows(os.path.join(split_dir, f"{s}_{split}.csv"))[:limit or None]):
            ids, k, truncated = mmlu.build_prompt(encode, s, shots, row, block_size, header)
            items.append({"id": f"{s}/{split}/{i}", "subject": s, "prompt": ids, "shots": k, "truncated": truncated,
                          "gold": LETTERS.index(row[5])})
    if not items:
        raise ValueError(f"no questions in the {split} CSVs of {', '.join(names)} in {split_dir}: empty files")
    return items


def question_records(items, logits):
    return [{"id": it["id"], "subject": it["subject"], "prediction": LETTERS[int(row.argmax())],
             "gold": LETTERS[it["gold"]], "scores": [round(v, 6) for v in row.tolist()], "shots": it["shots"],
             "truncated": it["truncated"]} for it, row in zip(items, logits)]


def print_report(r):
    print(f"{'subject':<40} {'category':<16} {'n':>5} {'acc':>6}")
    for s, p in r["subjects"].items():
        print(f"{s:<40} {p['category']:<16} {p['n']:>5} {p['accuracy']:>6.3f}")
    print(f"\n{'category':<40} {'subjects':>16} {'n':>5} {'acc':>6} (micro; macro over subjects)")
    for cat, c in r["categories"].items():
        print(f"{cat:<40} {c['subjects']:>16} {c['n']:>5} {c['accuracy']:>6.3f} ({c['macro_accuracy']:.3f})")
    print(f"\n{r['split']}, {r['ntrain']}-shot: accuracy {r['accuracy']:.4f} over {r['n']} questions "
          f"(macro over {len(r['subjects'])} subjects {r['macro_accuracy']:.4f}), macro-F1 {r['macro_f1']:.4f}")
    print(f"calibration: ECE (10 equal-width bins) {r['ece_10bin']:.4f}, RMS calibration error (the paper's, "
          f"calib_tools' adaptive bins of 100) {r['rms_calibration_error']:.4f}")
    print(f"shots used: mean {r['mean_shots']:.2f}, {r['fewer_shots']} questions with fewer than {r['ntrain']}; "
          f"{r['truncated']} prompts left-truncated to block_size {r['block_size']}")
    print(f"wall {r['wall_s']:.1f} s, scoring {r['score_s']:.1f} s, {r['questions_per_s']:.1f} questions/s")
    for note in r["notes"]:
        print(f"note: {note}")


def check_results_folder():
    """Stop before any scoring unless mmlu.json can be written beside the model (a missing model folder is
    load_scorer's to report)."""
    folder = results_dir(out_dir)
    if os.path.isdir(folder):
        try:
            check_writable(folder, ("mmlu.json",))
        except OSError as e:
            raise SystemExit(f"--out_dir={out_dir}: {e}")


def main():
    config = configure(globals())
    at_least(config, 0, "ntrain", "limit")
    at_least(config, 1, "batch_size")
    t0 = time.time()
    check_results_folder()
    root, split_dir, names = select_data()
    try:
        scorer, ckpt = load_scorer(out_dir, device, dtype, attn_impl, compile, batch_size, shared_prefix)
        letter_ids, note = mmlu.answer_tokens(scorer.encode)
        items = build_items(root, split_dir, names, scorer.encode, scorer.block_size)
    except (OSError, ValueError, RuntimeError) as e:  # bad settings, checkpoint, or a malformed CSV (file and line)
        raise SystemExit(str(e))
    notes = [note] if note else []
    if scorer.tok.spec["kind"] == "char":
        notes.append("char-level vocabulary: characters outside it are dropped from the prompts")
    t1 = time.time()
    # prompts with the same subject and shots begin alike: that prefix is computed once per subject
    groups = [(it["subject"], it["shots"]) if not it["truncated"] else i for i, it in enumerate(items)]
    logits = scorer.next_token_logits([it["prompt"] for it in items], letter_ids, groups)
    score_s = time.time() - t1
    shots_used = [it["shots"] for it in items]
    report = {"out_dir": out_dir, "iter_num": ckpt.get("iter_num"),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), "split": split, "ntrain": ntrain,
              "header": header, "block_size": scorer.block_size,
              **mmlu.summarize([it["subject"] for it in items], logits, torch.tensor([it["gold"] for it in items])),
              "truncated": sum(it["truncated"] for it in items), "mean_shots": sum(shots_used) / len(items),
              "fewer_shots": sum(k < ntrain for k in shots_used), "wall_s": time.time() - t0, "score_s": score_s,
              "questions_per_s": len(items) / score_s, "notes": notes, "questions": question_records(items, logits)}
    print_report(report)
    path = os.path.join(results_dir(out_dir), "mmlu.json")
    write_json(path, report)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
