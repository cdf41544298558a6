"""What the benchmark tasks share: their files (found in --data_dir, or downloaded once into the cache), rows read
with file:line errors, few-shot draws, the multiple-choice and generation loops on the scoring core, and the result
of a task: each metric's mean and standard error, and one record per question.

The prompts are lm-evaluation-harness's: a shot is its context, one space and its answer; shots are joined and
followed by "\n\n" (its fewshot_delimiter), then comes the question's context; a choice is scored as " " + choice.
"""
import json
import math
import os
import random
import re
import shutil
import time
import zipfile
from dataclasses import dataclass, field
from typing import Callable

import torch

from nanogpt.download import DownloadError, download_file
from nanogpt.files import numbered_jsonl, read_text, write_atomic
from nanogpt.scoring import encode_pair
from nanogpt.tasks import mmlu

CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "nanogpt-kernels")  # one folder per task family
SPACE = re.compile(r"\s*")


@dataclass
class Settings:
    """What eval.py hands every task."""
    data_dir: str = ""            # a folder holding the tasks' files under their canonical names ('': download)
    cache_dir: str = CACHE_DIR    # where downloads go, one subfolder per task family
    limit: int = 0                # questions per task; 0 = all
    num_fewshot: int = -1         # -1: each task's published default
    fewshot_seed: int = 1234      # shots are drawn per question from (seed, question id)
    max_new_tokens: int = 256     # generation budget (gsm8k, mmlu_cot)
    text_file: str = ""           # bpb: a text file, or a dataset folder of val shards
    text_split: str = "val"       # bpb: the dataset folder's split
    mmlu_split: str = "val"       # mmlu_cot's split
    samples: str = ""             # humaneval: a JSONL file of task_id and completion rows to score ('': generate)
    num_samples: int = 1          # humaneval: completions per problem
    temperature: float = 0.0      # humaneval: sampling temperature (0 with one sample: greedy)
    sandbox_workers: int = 0      # humaneval: programs run at a time (0: one per CPU core)
    rank: int = 0                 # this process scores questions rank, rank + world, ... of the first `limit`
    world: int = 1                # (train.py's tasks under DDP; eval.py runs them all in one process)

    def questions(self, rows):
        """The questions this process scores: the first `limit` (0: all), every world-th from rank on."""
        return rows[:self.limit or None][self.rank::self.world]

    def shots(self, default, has_shots=True):
        """The shots a task runs with: its default, or num_fewshot (a zero-shot-only task stays at 0)."""
        return default if self.num_fewshot < 0 or not has_shots else self.num_fewshot

# ----------------------------------------------------------------------------------------------------------- files


def find_local(data_dir, folder, name):
    """data_dir/name or data_dir/folder/name."""
    for path in (os.path.join(data_dir, name), os.path.join(data_dir, folder, name)):
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no {name} in {data_dir} or {os.path.join(data_dir, folder)}: put the task's files "
                            "there under their canonical names, or leave data_dir empty to download them")


def check_zip(path, members):
    """Raise ValueError unless path is a readable zip holding every member intact (each one's CRC is checked)."""
    try:
        with zipfile.ZipFile(path) as z:
            missing = sorted(set(members) - set(z.namelist()))
            if missing:
                raise ValueError(f"{path} lacks {missing}: not the expected archive")
            for member in members:
                with z.open(member) as f:
                    while f.read(1 << 20):  # the CRC is checked at the member's end
                        pass
    except (zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path} is not a readable zip ({e}): corrupt or incomplete download") from e


def fetch_zip(url, folder, members, check):
    """Download the zip at url once into folder (resumable), extract `members` {canonical name: path inside} there,
    check each with check(path), then mark the folder complete and delete the zip."""
    marker = os.path.join(folder, os.path.basename(url) + ".complete")
    if os.path.exists(marker):
        return
    archive = os.path.join(folder, os.path.basename(url))
    download_file(url, archive, validate=lambda p: check_zip(p, members.values()), desc=os.path.basename(url))
    extracted = {name: os.path.join(folder, name + ".tmp") for name in members}
    try:
        with zipfile.ZipFile(archive) as z:
            for name, member in members.items():
                with z.open(member) as src, open(extracted[name], "wb") as dst:
                    shutil.copyfileobj(src, dst)
        for name, path in extracted.items():
            try:
                check(path)
            except ValueError as e:  # intact, but not what the task reads: fetching it again is the only fix
                os.remove(archive)
                raise DownloadError(f"{url}: {name} in the archive is malformed ({e}); the archive was deleted") from e
        for name, path in extracted.items():
            os.replace(path, os.path.join(folder, name))
    finally:
        for path in extracted.values():
            if os.path.exists(path):
                os.remove(path)
    write_atomic(marker, url + "\n")
    os.remove(archive)


@dataclass
class Files:
    """Where a task's files come from: data_dir (or data_dir/folder) when data_dir is set, else cache_dir/folder,
    downloaded there once, each from its own URL or all from one zip archive."""
    folder: str
    urls: dict = field(default_factory=dict)      # canonical name -> URL of that file
    archive: str = ""                             # or the URL of a zip holding them ...
    members: dict = field(default_factory=dict)   # ... canonical name -> its path inside the zip

    def path(self, name, settings, check):
        """The local path of file `name`; a downloaded file must pass check(path) first."""
        if settings.data_dir:
            return find_local(settings.data_dir, self.folder, name)
        folder = os.path.join(settings.cache_dir, self.folder)
        os.makedirs(folder, exist_ok=True)
        if self.archive:
            fetch_zip(self.archive, folder, self.members, check)
            return os.path.join(folder, name)
        return download_file(self.urls[name], os.path.join(folder, name), validate=check, desc=name)

# ------------------------------------------------------------------------------------------------------------ rows


def convert_rows(path, numbered, convert):
    """convert(obj) for each (line, obj); a row it cannot read raises ValueError naming path:line."""
    out = []
    for line, obj in numbered:
        try:
            out.append(convert(obj))
        except KeyError as e:
            raise ValueError(f"{path}:{line}: missing field {e}") from None
        except (TypeError, ValueError, IndexError, AttributeError) as e:
            raise ValueError(f"{path}:{line}: {e}") from None
    return out


def read_jsonl(path, convert):
    """convert(row) for each line of a JSONL file."""
    return convert_rows(path, numbered_jsonl(path), convert)


def json_array_items(path):
    """(line, item) for each element of a file holding one JSON array, with the line the element starts on."""
    text = read_text(path)
    line_of = lambda i: text.count("\n", 0, i) + 1  # noqa: E731
    decoder, i = json.JSONDecoder(), SPACE.match(text).end()
    if text[i:i + 1] != "[":
        raise ValueError(f"{path}:{line_of(i)}: expected a JSON array")
    i = SPACE.match(text, i + 1).end()
    while text[i:i + 1] != "]":
        try:
            item, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        yield line_of(i), item
        i = SPACE.match(text, end).end()
        if text[i:i + 1] == ",":
            i = SPACE.match(text, i + 1).end()
        elif text[i:i + 1] != "]":
            raise ValueError(f"{path}:{line_of(i)}: expected ',' or ']' after an array item")


def read_json_array(path, convert):
    """convert(item) for each element of a JSON array file."""
    return convert_rows(path, json_array_items(path), convert)


def rows_of_file(path, convert, read):
    """read(path, convert), refusing a file without rows (there would be nothing to score or draw shots from)."""
    rows = read(path, convert)
    if not rows:
        raise ValueError(f"{path} holds no rows: an empty or cut file; put the task's file there again")
    return rows


def read_task_rows(files, name, convert, settings, read=read_jsonl):
    """The converted rows of a task file (downloaded and checked when needed)."""
    return rows_of_file(files.path(name, settings, lambda p: rows_of_file(p, convert, read)), convert, read)


def draw_shots(pool, k, key, seed):
    """k rows of pool drawn at random, as lm-evaluation-harness's default sampler draws them, but seeded by
    (seed, question id): a question gets the same shots whatever --limit or question order."""
    if k > len(pool):
        raise ValueError(f"num_fewshot {k} is more than the {len(pool)} shot candidates")
    return random.Random(f"{seed}:{key}").sample(pool, k) if k else []

# --------------------------------------------------------------------------------------------------------- results


def mean_and_stderr(values):
    """The mean and its standard error (sample standard deviation / sqrt(n), as lm-evaluation-harness reports it;
    None for fewer than two values)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def task_result(name, shots, records, metrics, start, notes=()):
    """A task's result: each metric's mean and stderr over the per-question records, and the records."""
    means = {m: mean_and_stderr([r[m] for r in records]) for m in metrics}
    return {"task": name, "shots": shots, "n": len(records), "seconds": time.time() - start,
            "metrics": {m: v for m, (v, _) in means.items()}, "stderr": {m: se for m, (_, se) in means.items()},
            "notes": [n for n in notes if n], "records": records}


def macro_f1(golds, predictions):
    """Macro-F1 over the answer classes (choice positions: the letters A, B, ...), as eval_mmlu.py computes it
    (mmlu.macro_f1: the mean over classes someone answered or got of 2 TP / (2 TP + FP + FN), as sklearn's
    f1_score(average="macro") averages over the labels present)."""
    gold, pred = torch.tensor(golds), torch.tensor(predictions)
    return mmlu.macro_f1(pred, gold, n_classes=int(max(gold.max(), pred.max())) + 1) if len(golds) else None


def with_macro_f1(result):
    """A multiple-choice result with macro_f1 (of the acc predictions) and macro_f1_norm (of acc_norm's) added
    beside them; not a mean over questions, so without a standard error."""
    records = result["records"]
    for metric, key, name in (("acc", "prediction", "macro_f1"), ("acc_norm", "prediction_norm", "macro_f1_norm")):
        if metric in result["metrics"]:
            result["metrics"][name] = macro_f1([r["gold"] for r in records], [r[key] for r in records])
            result["stderr"][name] = None
    return result


def truncation_note(lengths, block_size):
    cut = sum(n > block_size for n in lengths)
    return f"{cut} of {len(lengths)} sequences left-truncated to block_size {block_size}" if cut else ""

# ------------------------------------------------------------------------------------------------- multiple choice


@dataclass
class Question:
    id: str
    contexts: list     # the text before the choices: one for all, or one per choice (Winogrande)
    choices: list      # each scored as " " + choice after its context
    gold: object       # the right choice's index; TruthfulQA MC2: 1 (true) or 0 (false) per choice

    def shot(self):
        """The question answered, as a few-shot example."""
        return f"{self.contexts[self.gold if len(self.contexts) > 1 else 0]} {self.choices[self.gold]}"


def argmax(values):
    return max(range(len(values)), key=values.__getitem__)  # the first of equal maxima, as numpy's


def choice_record(q, logprobs, metrics):
    """One question's record: its choices' summed log-likelihoods and the metrics asked for. acc: the likeliest
    choice is right; acc_norm: the likeliest per character of the choice (lm-evaluation-harness divides by
    len(choice): characters, the same as UTF-8 bytes for ASCII text); mc2: the probability mass, normalised over
    the choices, of the true ones."""
    lls = [float(lp.sum()) for lp in logprobs]
    record = {"id": q.id, "gold": q.gold, "scores": [round(v, 6) for v in lls]}
    if "acc" in metrics:
        record["prediction"] = argmax(lls)
        record["acc"] = int(record["prediction"] == q.gold)
    if "acc_norm" in metrics:
        record["prediction_norm"] = argmax([ll / max(len(c), 1) for ll, c in zip(lls, q.choices)])
        record["acc_norm"] = int(record["prediction_norm"] == q.gold)
    if "mc2" in metrics:  # a softmax over the log-likelihoods (lm-eval: exp, then normalise)
        top = max(lls)
        probs = [math.exp(ll - top) for ll in lls]
        record["mc2"] = sum(p for p, true in zip(probs, q.gold) if true) / sum(probs)
    return record


def score_choices(scorer, questions, texts, metrics, desc):
    """(choice_record of each question, truncation note) from the (context, continuation, question index) texts of
    every choice of every question, in order."""
    pairs = [encode_pair(scorer.encode, context, choice, scorer.tok.eot) for context, choice, _ in texts]
    # a question's choices share their shots and context: computed once (scoring.Scorer.plan)
    logprobs = iter(scorer.loglikelihoods(pairs, [n for _, _, n in texts], desc=desc))
    records = [choice_record(q, [next(logprobs) for _ in q.choices], metrics) for q in questions]
    return records, truncation_note([len(c) + len(x) - 1 for c, x in pairs], scorer.block_size)


@dataclass
class MultipleChoice:
    name: str
    files: Files
    eval_file: str
    shot_file: str               # '' when the task is zero-shot only
    to_question: Callable        # one row of the files -> Question
    num_fewshot: int
    metrics: tuple = ("acc", "acc_norm")
    read: Callable = read_jsonl

    def texts(self, questions, pool, k, seed):
        """(context, continuation, question index) for every choice of every question: the question's k shots and
        its context, then " " + the choice."""
        out = []
        for n, q in enumerate(questions):
            shots = "".join(s.shot() + "\n\n" for s in draw_shots(pool, k, q.id, seed))
            contexts = q.contexts * len(q.choices) if len(q.contexts) == 1 else q.contexts
            out += [(shots + context, " " + choice, n) for context, choice in zip(contexts, q.choices)]
        return out

    def run(self, scorer, settings):
        start, k = time.time(), settings.shots(self.num_fewshot, bool(self.shot_file))
        questions = read_task_rows(self.files, self.eval_file, self.to_question, settings, self.read)
        questions = settings.questions(questions)
        pool = read_task_rows(self.files, self.shot_file, self.to_question, settings, self.read) if k else []
        texts = self.texts(questions, pool, k, settings.fewshot_seed)
        records, note = score_choices(scorer, questions, texts, self.metrics, self.name)
        return with_macro_f1(task_result(self.name, k, records, self.metrics, start, [note]))


# ------------------------------------------------------------------------------------------------------ generation


@dataclass
class Generation:
    name: str
    read_questions: Callable     # (settings, shots wanted) -> (problems, shot pool); a problem has an .id
    num_fewshot: int             # 0: zero-shot only
    prompt: Callable             # (problem, shots) -> prompt text
    stop: tuple                  # the output ends before the first of these
    grade: Callable              # (output, problem) -> record fields, each metric among them
    metrics: tuple

    def run(self, scorer, settings):
        start, k = time.time(), settings.shots(self.num_fewshot, self.num_fewshot > 0)
        problems, pool = self.read_questions(settings, k)
        problems = settings.questions(problems)
        prompts = [scorer.encode(self.prompt(p, draw_shots(pool, k, p.id, settings.fewshot_seed))) for p in problems]
        outputs = scorer.generate(prompts, settings.max_new_tokens, self.stop, desc=self.name)
        records = [{"id": p.id, "output": out, **self.grade(out, p)} for p, out in zip(problems, outputs)]
        note = truncation_note(list(map(len, prompts)), scorer.block_size - settings.max_new_tokens)
        return task_result(self.name, k, records, self.metrics, start, [note])
