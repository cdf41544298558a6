"""Questions/s of every eval.py task on this machine, with and without the shared prefix (scoring.Scorer).

    python bench/eval_tasks.py --out_dir=out-base --limit=100 --repeats=5   # bench/RESULTS.md has the table

The benchmarks' own files are not available offline here, so HellaSwag, ARC, Winogrande and TruthfulQA are scored
on rows in their real file formats whose lengths follow the real sets' (words from tiny Shakespeare, seeded: HellaSwag
a 40-word context and four 20-word endings, ARC a 25-word question and four 4-word choices, Winogrande a 22-word
sentence, TruthfulQA a 12-word question with 5 (MC1) or 7 (MC2) 10-word answers); GSM8K reads train.jsonl as its
test split, mmlu_cot MMLU's val split, bpb tiny Shakespeare. Every task runs at its published shots.
"""
import json
import os
import random
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from configurator import at_least, configure  # noqa: E402
from nanogpt.scoring import load_scorer  # noqa: E402
from nanogpt.tasks import TASKS  # noqa: E402
from nanogpt.tasks.common import Settings  # noqa: E402

out_dir = "out"                # the checkpoint
limit = 100                    # questions per task (generation tasks: limit // 10)
shared_data = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")  # offline data
max_new_tokens = 256           # generation budget (gsm8k, mmlu_cot)
batch_size = 16                # sequences per forward pass
device = "cpu"                 # where to run
seed = 0                       # the synthetic rows
repeats = 3                    # runs per cell, the two modes interleaved: the median is reported


def words_from(text_path, rng):
    """text(n): n consecutive words from a random place of the file."""
    with open(text_path, encoding="utf-8") as f:
        words = f.read().split()

    def text(n):
        start = rng.randrange(len(words) - n)
        return " ".join(words[start:start + n])
    return text


def synthetic_files(folder, text, n=400):
    """Real-format rows of real-like lengths for the tasks without an offline copy."""
    def jsonl(name, rows):
        with open(os.path.join(folder, name), "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    rng = random.Random(seed)
    for name in ("hellaswag_val.jsonl", "hellaswag_train.jsonl"):
        jsonl(name, [{"ind": i, "activity_label": text(2), "ctx_a": text(36), "ctx_b": text(4), "ctx": "",
                      "label": rng.randrange(4), "endings": [text(20) for _ in range(4)]} for i in range(n)])
    for subset in ("Easy", "Challenge"):
        for split in ("Test", "Train"):
            jsonl(f"ARC-{subset}-{split}.jsonl", [{"id": f"{split}{i}", "question": {"stem": text(25), "choices": [
                {"text": text(4), "label": label} for label in "ABCD"]}, "answerKey": rng.choice("ABCD")}
                for i in range(n)])
    for name in ("dev.jsonl", "train_xl.jsonl"):
        jsonl(name, [{"qID": f"{name}{i}", "sentence": f"{text(12)} _ {text(10)}", "option1": text(1),
                      "option2": text(1), "answer": rng.choice("12")} for i in range(n)])
    with open(os.path.join(folder, "mc_task.json"), "w") as f:
        json.dump([{"question": text(12), "mc1_targets": {text(10) + f" {j}": int(j == 0) for j in range(5)},
                    "mc2_targets": {text(10) + f" {j}": int(j < 3) for j in range(7)}} for _ in range(n)], f)


def main():
    torch.manual_seed(0)
    text = words_from(os.path.join(shared_data, "tinyshakespeare", "input.txt"), random.Random(seed))
    with tempfile.TemporaryDirectory() as folder:
        synthetic_files(folder, text)
        os.symlink(os.path.join(shared_data, "mmlu"), os.path.join(folder, "mmlu"))
        os.makedirs(os.path.join(folder, "gsm8k"))
        os.symlink(os.path.join(shared_data, "gsm8k", "train.jsonl"), os.path.join(folder, "gsm8k", "train.jsonl"))
        os.symlink(os.path.join(shared_data, "gsm8k", "train.jsonl"), os.path.join(folder, "gsm8k", "test.jsonl"))
        try:
            scorers = {mode: load_scorer(out_dir, device, batch_size=batch_size, shared_prefix=mode)[0]
                       for mode in (True, False)}
        except (OSError, ValueError, RuntimeError) as e:  # no checkpoint there, an unreadable one: the message says
            raise SystemExit(str(e))
        print("| task | shots | questions | questions/s (shared prefix) | questions/s (whole sequences) |")
        print("|---|---:|---:|---:|---:|")
        for name, task in TASKS.items():
            generates = name in ("gsm8k", "mmlu_cot")
            settings = Settings(data_dir=folder, limit=limit // 10 if generates else limit,
                                max_new_tokens=max_new_tokens,
                                text_file=os.path.join(shared_data, "tinyshakespeare", "input.txt"))
            modes = (True,) if generates or name == "bpb" else (True, False)  # nothing shared: one mode says it
            runs = {mode: [] for mode in modes}
            for _ in range(repeats):  # the two modes interleaved, so drifts of this noisy machine hit both alike
                for mode in modes:
                    result = task.run(scorers[mode], settings)
                    runs[mode].append(result["n"] / result["seconds"])
            shared = statistics.median(runs[True])
            whole = statistics.median(runs[False]) if False in runs else shared
            print(f"| {name} | {result['shots']} | {result['n']} | {shared:.2f} | {whole:.2f} |", flush=True)


if __name__ == "__main__":
    config = configure(globals())
    at_least(config, 1, "limit", "batch_size", "max_new_tokens", "repeats")
    main()
