"""5-shot MMLU (Hendrycks et al., ICLR 2021) for a checkpoint of this repo, with the protocol of the release's
evaluate.py: the subject's first `ntrain` dev questions as shots (dropped from the end until the prompt fits the
context), then the question ending in "Answer:"; the prediction is whichever of " A", " B", " C", " D" gets the
highest next-token logit.

    python eval_mmlu.py --out_dir=out-x                              # downloads data.tar once into cache_dir
    python eval_mmlu.py --out_dir=out-x --subjects=marketing,virology --limit=50
    python eval_mmlu.py --out_dir=out-x --data_dir=../shared/data/mmlu --split=val

Prints and writes to out_dir/mmlu.json: accuracy per subject, per category (micro over questions, and macro over
subjects) and overall (micro, and macro over subjects), macro-F1 over the four letters, expected calibration error,
the shots actually used, the prompts that had to be truncated, and the throughput.
"""
import csv
import json
import os
import re
import shutil
import tarfile
import time
from contextlib import nullcontext
from typing import Literal

import requests
import torch
from tqdm import tqdm

from checkpoint import load_model
from configurator import at_least, configure
from data.download import DownloadError, download_file
from runtime import (ATTN_IMPLS, DTYPE_SETTINGS, autocast_for, device_type, resolve_attn_impl, resolve_device,
                     resolve_dtype)

out_dir = "out"                # the checkpoint to evaluate (ckpt.pt, or a sharded run's newest step_N/)
ntrain = 5                     # shots (the subject's first ntrain dev questions)
split: Literal["test", "val"] = "test"
subjects = ""                  # comma list; '' = every subject the split holds (57 in the release)
data_dir = ""                  # folder with dev/ and test/ (or data/dev, ...); '' = download data_url into cache_dir
cache_dir = os.path.join(os.path.expanduser("~"), ".cache", "nanogpt-kernels", "mmlu")
data_url = "https://people.eecs.berkeley.edu/~hendrycks/data.tar"
limit = 0                      # questions per subject; 0 = all
batch_size = 16                # prompts per forward pass (right-padded, sorted by length)
device = "auto"                # 'auto' (cuda when there is a GPU, else cpu), 'cpu', 'cuda', 'cuda:N', 'xla'
dtype: Literal[DTYPE_SETTINGS] = "auto"  # 'auto': bfloat16 on CUDA, else float32
attn_impl: Literal[ATTN_IMPLS] = "auto"  # 'auto' (triton on CUDA, sdpa elsewhere)
compile = False                # torch.compile the model (dynamic shapes)

LETTERS = ("A", "B", "C", "D")
# The release's categories.py maps subjects to subcategories and those to four groups; this is the composition.
CATEGORIES = {
    "STEM": ["abstract_algebra", "astronomy", "college_biology", "college_chemistry", "college_computer_science",
             "college_mathematics", "college_physics", "computer_security", "conceptual_physics",
             "electrical_engineering", "elementary_mathematics", "high_school_biology", "high_school_chemistry",
             "high_school_computer_science", "high_school_mathematics", "high_school_physics",
             "high_school_statistics", "machine_learning"],
    "humanities": ["formal_logic", "high_school_european_history", "high_school_us_history",
                   "high_school_world_history", "international_law", "jurisprudence", "logical_fallacies",
                   "moral_disputes", "moral_scenarios", "philosophy", "prehistory", "professional_law",
                   "world_religions"],
    "social sciences": ["econometrics", "high_school_geography", "high_school_government_and_politics",
                        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
                        "human_sexuality", "professional_psychology", "public_relations", "security_studies",
                        "sociology", "us_foreign_policy"],
    "other": ["anatomy", "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging",
              "management", "marketing", "medical_genetics", "miscellaneous", "nutrition", "professional_accounting",
              "professional_medicine", "virology"],
}
CATEGORY_OF = {s: cat for cat, names in CATEGORIES.items() for s in names}
SUBJECTS = sorted(CATEGORY_OF)
CSV_NAME = re.compile(r"data/(dev|val|test)/(\w+)_(dev|val|test)\.csv")

# ------------------------------------------------------------------------------------------------------------ data


def check_release(path):
    """Raise ValueError unless path is a complete tar holding data/dev/*_dev.csv, each with its test CSV."""
    try:
        with tarfile.open(path, "r:") as tar:
            names = tar.getnames()  # walks every header: a file cut inside a member fails here
            end = tar.offset
    except (tarfile.TarError, EOFError) as e:
        raise ValueError(f"{path} is not a readable tar ({e}): corrupt or incomplete download") from e
    with open(path, "rb") as f:
        f.seek(end)
        if f.read(1024) != bytes(1024):  # a tar ends in two zero blocks: a file cut between members lacks them
            raise ValueError(f"{path} ends without the tar end-of-archive blocks: corrupt or incomplete download")
    dev = {m.group(2) for m in map(CSV_NAME.fullmatch, names) if m and m.group(1) == "dev"}
    missing = sorted(s for s in dev if f"data/test/{s}_test.csv" not in names)
    if not dev or missing:
        raise ValueError(f"{path} is not the MMLU release: no data/dev/*_dev.csv, or dev without test for {missing}")
    print(f"{path}: tar complete, {len(dev)} of {len(SUBJECTS)} subjects")


def fetch_release(url, cache):
    """The data/ folder of the release, downloaded and extracted once into `cache`; its marker is written last."""
    data, marker = os.path.join(cache, "data"), os.path.join(cache, "complete")
    if os.path.exists(marker):
        return data
    tar_path, tmp = os.path.join(cache, "data.tar"), os.path.join(cache, "extracting")
    download_file(url, tar_path, validate=check_release, desc="MMLU data.tar")  # resumes a .part; checks before rename
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(tar_path) as tar:  # only the question CSVs: plain files whose names the regex pins (no ../)
        tar.extractall(tmp, members=[m for m in tar.getmembers() if m.isfile() and CSV_NAME.fullmatch(m.name)])
    shutil.rmtree(data, ignore_errors=True)
    os.replace(os.path.join(tmp, "data"), data)
    os.rmdir(tmp)
    with open(marker, "w") as f:
        f.write(url + "\n")
    os.remove(tar_path)
    return data


def data_root(path):
    """The folder holding dev/: path itself or path/data (the release's layout)."""
    for root in (path, os.path.join(path, "data")):
        if os.path.isdir(os.path.join(root, "dev")):
            return root
    raise FileNotFoundError(f"no dev/ folder in {path} or {path}/data: data_dir must hold the MMLU CSV folders")


def read_rows(path):
    """Rows [question, A, B, C, D, answer] of an MMLU CSV (no header; fields may hold commas, quotes, newlines)."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        line = 1
        for row in reader:
            if len(row) != 6:
                raise ValueError(f"{path}:{line}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
            if row[5] not in LETTERS:
                raise ValueError(f"{path}:{line}: answer must be one of A, B, C, D, got {row[5]!r}")
            rows.append(row)
            line = reader.line_num + 1  # a quoted field may span lines: the next row starts after this one
    return rows


def pick_subjects(spec, available, split_name="test"):
    """The subjects to evaluate: those named in the comma list `spec`, or every known one in `available`."""
    if not spec:
        return [s for s in SUBJECTS if s in available]
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in names if s not in CATEGORY_OF]
    if unknown:
        raise ValueError(f"unknown subjects {unknown}; valid subjects: {', '.join(SUBJECTS)}")
    absent = [s for s in names if s not in available]
    if absent:
        raise ValueError(f"no {split_name} CSV for {absent} in this data folder")
    return names

# --------------------------------------------------------------------------------------------------------- prompts


def format_example(row, answer=True):
    """One question as the release writes it; with its answer it is a shot, without it the prompt's end."""
    text = row[0] + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, row[1:5])) + "\nAnswer:"
    return text + f" {row[5]}\n\n" if answer else text


def prompt_text(subject, shots, row):
    # one space before the subject, as lm-evaluation-harness and HELM write it; the release's evaluate.py writes two
    # ("about {}." filled with format_subject's " abstract algebra"), a quirk not reproduced here
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return header + "".join(format_example(s) for s in shots) + format_example(row, answer=False)


def build_prompt(encode, subject, shots, row, block_size):
    """(token ids, shots used, truncated): shots are dropped from the end until the prompt fits block_size; a prompt
    that does not fit even with none keeps its last block_size tokens."""
    for k in range(len(shots), -1, -1):
        ids = encode(prompt_text(subject, shots[:k], row))
        if len(ids) <= block_size:
            return ids, k, False
    return ids[-block_size:], 0, True


def make_encoder(tok):
    """tok.encode, except that a char-level vocabulary skips characters it lacks (MMLU is not Shakespeare)."""
    if tok.spec["kind"] == "char":
        return lambda text: [tok.stoi[ch] for ch in text if ch in tok.stoi]
    return tok.encode


def answer_tokens(encode):
    """Token ids of ' A'..' D' (the release's choice), or the first token of 'A'..'D' when those are not single
    tokens (a char-level vocabulary); the note says which."""
    spaced = [encode(" " + letter) for letter in LETTERS]
    if all(len(ids) == 1 for ids in spaced):
        return [ids[0] for ids in spaced], None
    bare = [encode(letter) for letter in LETTERS]
    if not all(bare):
        raise ValueError("this tokenizer cannot encode the answer letters A-D")
    return [ids[0] for ids in bare], "' A'..' D' are not single tokens here: scored the tokens of 'A'..'D'"

# --------------------------------------------------------------------------------------------------------- scoring


@torch.inference_mode()
def letter_logits(model, prompts, letter_ids, batch_size, device, ctx=nullcontext()):
    """(N, 4) float32 logits of the answer letters after each prompt: batches of similar lengths, right-padded, each
    row read at its own last token (padding after it cannot reach it through causal attention)."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first: an OOM shows at once
    letters = torch.tensor(letter_ids, device=device)
    out = torch.empty(len(prompts), len(letter_ids))
    for start in tqdm(range(0, len(order), batch_size), desc="batches", leave=False):
        batch = order[start:start + batch_size]
        lengths = torch.tensor([len(prompts[i]) for i in batch])
        x = torch.zeros(len(batch), int(lengths.max()), dtype=torch.long)
        for row, i in enumerate(batch):
            x[row, :lengths[row]] = torch.tensor(prompts[i])
        with ctx:
            logits, _ = model(x.to(device), last_pos=(lengths - 1).to(device))
        out[batch] = logits[:, letters].float().cpu()
    return out

# --------------------------------------------------------------------------------------------------------- metrics


def macro_f1(pred, gold, n_classes=4):
    """Mean over letters of F1 = 2TP / (2TP + FP + FN). A letter never predicted and never gold (0/0) is left out of
    the mean, as sklearn's macro average does (it averages over the labels present)."""
    scores = []
    for c in range(n_classes):
        tp = int(((pred == c) & (gold == c)).sum())
        wrong = int(((pred == c) != (gold == c)).sum())  # FP + FN
        if tp + wrong:
            scores.append(2 * tp / (2 * tp + wrong))
    return sum(scores) / len(scores) if scores else 0.0


def expected_calibration_error(logits, gold, n_bins=10):
    """ECE of the softmax over the letters: confidences in n_bins equal-width bins [k/n, (k+1)/n) (1.0 in the last),
    sum over bins of (bin size / N) * |accuracy - mean confidence|."""
    conf, pred = logits.float().softmax(-1).max(-1)
    correct = (pred == gold).float()
    bins = (conf * n_bins).long().clamp(max=n_bins - 1)
    ece = 0.0
    for b in bins.unique().tolist():
        m = bins == b
        ece += m.float().mean().item() * abs(correct[m].mean().item() - conf[m].mean().item())
    return ece


def summarize(subject_of, logits, gold):
    """Accuracy per subject, per category (micro over questions and macro over subjects) and overall; macro-F1; ECE.
    subject_of: the subject of each question; logits (N, 4); gold (N,) letter indices."""
    correct = (logits.argmax(-1) == gold).float()
    names = list(dict.fromkeys(subject_of))
    idx = {s: torch.tensor([i for i, t in enumerate(subject_of) if t == s]) for s in names}
    per = {s: {"category": CATEGORY_OF[s], "n": len(idx[s]), "accuracy": correct[idx[s]].mean().item()} for s in names}
    cats = {}
    for cat in CATEGORIES:
        members = [s for s in names if CATEGORY_OF[s] == cat]
        if members:
            rows = torch.cat([idx[s] for s in members])
            cats[cat] = {"n": len(rows), "subjects": len(members), "accuracy": correct[rows].mean().item(),
                         "macro_accuracy": sum(per[s]["accuracy"] for s in members) / len(members)}
    return {"n": len(gold), "accuracy": correct.mean().item(),
            "macro_accuracy": sum(p["accuracy"] for p in per.values()) / len(per),
            "macro_f1": macro_f1(logits.argmax(-1), gold), "ece": expected_calibration_error(logits, gold),
            "categories": cats, "subjects": per}


def print_report(r):
    print(f"{'subject':<40} {'category':<16} {'n':>5} {'acc':>6}")
    for s, p in r["subjects"].items():
        print(f"{s:<40} {p['category']:<16} {p['n']:>5} {p['accuracy']:>6.3f}")
    print(f"\n{'category':<40} {'subjects':>16} {'n':>5} {'acc':>6} (micro; macro over subjects)")
    for cat, c in r["categories"].items():
        print(f"{cat:<40} {c['subjects']:>16} {c['n']:>5} {c['accuracy']:>6.3f} ({c['macro_accuracy']:.3f})")
    print(f"\n{r['split']}, {r['ntrain']}-shot: accuracy {r['accuracy']:.4f} over {r['n']} questions "
          f"(macro over {len(r['subjects'])} subjects {r['macro_accuracy']:.4f}), macro-F1 {r['macro_f1']:.4f}, "
          f"ECE {r['ece']:.4f}")
    print(f"shots used: mean {r['mean_shots']:.2f}, {r['fewer_shots']} questions with fewer than {r['ntrain']}; "
          f"{r['truncated']} prompts left-truncated to block_size {r['block_size']}")
    print(f"wall {r['wall_s']:.1f} s, scoring {r['score_s']:.1f} s, {r['questions_per_s']:.1f} questions/s")
    for note in r["notes"]:
        print(f"note: {note}")

# ------------------------------------------------------------------------------------------------------------ main


def select_data():
    """(folder holding dev/, folder of the split, subjects to evaluate) from the config globals."""
    try:
        root = data_root(data_dir) if data_dir else fetch_release(data_url, cache_dir)
    except DownloadError as e:
        raise SystemExit(f"MMLU data: {e}; or point --data_dir at a folder holding the release's dev/ and test/ "
                         "CSV folders")
    except (OSError, RuntimeError, ValueError, requests.RequestException) as e:
        raise SystemExit(f"MMLU data: {e}")
    split_dir = os.path.join(root, split)
    available = {f.removesuffix(f"_{split}.csv") for f in os.listdir(split_dir)} if os.path.isdir(split_dir) else set()
    try:
        names = pick_subjects(subjects, available, split)
    except ValueError as e:
        raise SystemExit(str(e))
    if not names:
        raise SystemExit(f"no {split} CSVs in {split_dir}")
    return root, split_dir, names


def main():
    t0 = time.time()
    try:
        dev = resolve_device(device)
        ctx = autocast_for(device_type(dev), resolve_dtype(dtype, device_type(dev))[1])
    except ValueError as e:
        raise SystemExit(f"config error: {e}")
    root, split_dir, names = select_data()
    try:
        model, tok, ckpt = load_model(out_dir, dev, resolve_attn_impl(attn_impl, device_type(dev)))
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise SystemExit(str(e))
    block_size = model.config.block_size
    if compile:
        model = torch.compile(model, dynamic=True)  # prompt lengths vary from batch to batch
    encode = make_encoder(tok)
    letter_ids, note = answer_tokens(encode)
    notes = [note] if note else []
    if tok.spec["kind"] == "char":
        notes.append("char-level vocabulary: characters outside it are dropped from the prompts")
    items = []  # (subject, prompt ids, shots used, truncated, gold letter index) per question
    try:
        for s in names:
            shots = read_rows(os.path.join(root, "dev", f"{s}_dev.csv"))[:ntrain]
            for row in read_rows(os.path.join(split_dir, f"{s}_{split}.csv"))[:limit or None]:
                items.append((s, *build_prompt(encode, s, shots, row, block_size), LETTERS.index(row[5])))
    except (OSError, ValueError) as e:  # a malformed or missing CSV: the message names the file and line
        raise SystemExit(str(e))
    subject_of, prompts, shots_used, truncated, gold = zip(*items)
    t1 = time.time()
    logits = letter_logits(model, prompts, letter_ids, batch_size, dev, ctx)
    score_s = time.time() - t1
    report = {"out_dir": out_dir, "iter_num": ckpt.get("iter_num"), "split": split, "ntrain": ntrain,
              "block_size": block_size, **summarize(subject_of, logits, torch.tensor(gold)),
              "truncated": sum(truncated), "mean_shots": sum(shots_used) / len(shots_used),
              "fewer_shots": sum(k < ntrain for k in shots_used), "wall_s": time.time() - t0, "score_s": score_s,
              "questions_per_s": len(prompts) / score_s, "notes": notes}
    print_report(report)
    path = os.path.join(out_dir, "mmlu.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(path + ".tmp", path)  # a reader never sees half a file
    print(f"wrote {path}")


if __name__ == "__main__":
    config = configure(globals())
    at_least(config, 0, "ntrain", "limit")
    at_least(config, 1, "batch_size")
    main()
