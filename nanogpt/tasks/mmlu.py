"""MMLU (Hendrycks et al., ICLR 2021): the release's data, its prompt format and its metrics, shared by eval_mmlu.py
(5-shot, the answer letter's next-token logit) and the chain-of-thought task (nanogpt/tasks/mmlu_cot.py).

Data: the release's data.tar (data/{dev,val,test}/<subject>_<split>.csv: no header; question, A, B, C, D, answer),
downloaded and extracted once, or a local folder holding dev/ and the split's folder.
"""
import csv
import io
import os
import re
import shutil
import tarfile

import numpy as np
import torch

from nanogpt.download import download_file
from nanogpt.files import read_text, write_atomic

RELEASE_URL = "https://people.eecs.berkeley.edu/~hendrycks/data.tar"
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
# The prompt's first line. 'lm_eval': one space before the subject, as lm-evaluation-harness writes it;
# 'release': two, as the release's evaluate.py writes it ("about {}." filled with format_subject's " abstract algebra").
HEADERS = {"lm_eval": "The following are multiple choice questions (with answers) about {}.\n\n",
           "release": "The following are multiple choice questions (with answers) about  {}.\n\n"}

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
    write_atomic(marker, url + "\n")
    os.remove(tar_path)
    return data


def data_root(path):
    """The folder holding dev/: path itself, path/data (the release's layout) or path/mmlu (a shared data folder)."""
    for root in (path, os.path.join(path, "data"), os.path.join(path, "mmlu")):
        if os.path.isdir(os.path.join(root, "dev")):
            return root
    raise FileNotFoundError(f"no dev/ folder in {path}, {path}/data or {path}/mmlu: the MMLU CSV folders go there")


def read_rows(path):
    """Rows [question, A, B, C, D, answer] of an MMLU CSV (no header; fields may hold commas, quotes, newlines);
    invalid UTF-8 or a malformed row is a ValueError naming file:line."""
    rows = []
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    line = 1
    try:
        for row in reader:
            if len(row) != 6:
                raise ValueError(f"{path}:{line}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
            if row[5] not in LETTERS:
                raise ValueError(f"{path}:{line}: answer must be one of A, B, C, D, got {row[5]!r}")
            rows.append(row)
            line = reader.line_num + 1  # a quoted field may span lines: the next row starts after this one
    except csv.Error as e:
        raise ValueError(f"{path}:{line}: not a CSV row ({e})") from None
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


def split_subjects(root, split):
    """Subjects with a CSV in root/split."""
    folder = os.path.join(root, split)
    return {f.removesuffix(f"_{split}.csv") for f in os.listdir(folder) if f.endswith(f"_{split}.csv")} \
        if os.path.isdir(folder) else set()

# --------------------------------------------------------------------------------------------------------- prompts


def format_example(row, answer=True):
    """One question as the release writes it; with its answer it is a shot, without it the prompt's end."""
    text = row[0] + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, row[1:5])) + "\nAnswer:"
    return text + f" {row[5]}\n\n" if answer else text


def header_text(subject, header="lm_eval"):
    return HEADERS[header].format(subject.replace("_", " "))


def prompt_text(subject, shots, row, header="lm_eval"):
    return header_text(subject, header) + "".join(format_example(s) for s in shots) + format_example(row, answer=False)


def build_prompt(encode, subject, shots, row, block_size, header="lm_eval"):
    """(token ids, shots used, truncated): shots are dropped from the end until the prompt fits block_size; a prompt
    that does not fit even with none keeps its last block_size tokens."""
    for k in range(len(shots), -1, -1):
        ids = encode(prompt_text(subject, shots[:k], row, header))
        if len(ids) <= block_size:
            return ids, k, False
    return ids[-block_size:], 0, True


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


def rms_calibration_error(logits, gold, per_bin=100):
    """The MMLU paper's RMS calibration error, computed the way the release's calib_tools.rmsce computes it from
    (correct, max softmax probability) pairs, quirks included: each question becomes a binary prediction with
    confidence max(p, 1 - p), right when (p > 0.5) == correct; those are sorted into int(N / per_bin) adaptive bins
    (upper edges at evenly spaced ranks; an edge value falls in the bin above) and the figure is
    (sum over bins of (n_b / N)^2 (accuracy_b - confidence_b)^2) ** (1/4): the bin weights squared and two square
    roots, not the textbook sqrt(sum n_b / N (accuracy_b - confidence_b)^2)."""
    p, pred = logits.double().softmax(-1).max(-1)
    correct = (pred == gold).numpy()
    above = p.numpy() > 0.5
    conf = np.where(above, p.numpy(), 1 - p.numpy())
    right = np.where(above, correct, ~correct).astype(np.float64)
    n_bins, n = len(conf) // per_bin, len(conf)
    ranks = np.minimum(np.round(np.linspace(0, n, n_bins, endpoint=False)).astype(int), n - 1)
    bins = np.digitize(conf, np.sort(conf)[ranks][1:])
    total = 0.0
    for b in np.unique(bins):
        m = bins == b
        total += (m.sum() / n) ** 2 * (right[m].mean() - conf[m].mean()) ** 2
    return float(np.sqrt(np.sqrt(total)))


def summarize(subject_of, logits, gold):
    """Accuracy per subject, per category (micro over questions and macro over subjects) and overall; macro-F1; the
    10-bin ECE and the paper's RMS calibration error. subject_of: each question's subject; logits (N, 4); gold (N,)."""
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
            "macro_f1": macro_f1(logits.argmax(-1), gold), "ece_10bin": expected_calibration_error(logits, gold),
            "rms_calibration_error": rms_calibration_error(logits, gold), "categories": cats, "subjects": per}
