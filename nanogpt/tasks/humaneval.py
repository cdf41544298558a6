"""HumanEval (Chen et al., 2021): 164 Python functions to complete from their signature and docstring, graded by
running the problem's unit tests on the completion, in the sandbox (nanogpt/sandbox.py) and nowhere else.

Protocol (the original release, openai/human-eval, and the paper): the prompt is the problem's `prompt` as it is
(completion style, no shots); a completion is generated until one of the paper's stop sequences "\\nclass",
"\\ndef", "\\n#", "\\nif", "\\nprint" (or EOT, or max_new_tokens), cut before it; the program run is
prompt + completion + "\\n" + test + "\\n" + "check(entry_point)", as the release's check_correctness builds it,
and it passes when it exits with status 0 within the timeout (3 s, the release's default).

n completions per problem (num_samples) at a temperature (0 with n = 1: greedy), or given ones (--samples, a JSONL
file of task_id and completion rows, as the release's evaluate_functional_correctness reads them). pass@k for each
k in 1, 10, 100 up to n is the unbiased estimator of the paper, 1 - C(n - c, k) / C(n, k) for c correct of n,
averaged over problems.
Files: HumanEval.jsonl.gz of the release (one JSON object a line: task_id, prompt, entry_point,
canonical_solution, test).
"""
import os
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from nanogpt.sampling import SamplingParams, sampler
from nanogpt.sandbox import Limits, check_sandbox, run_programs
from nanogpt.tasks.common import Files, convert_rows, read_task_rows, task_result
from nanogpt.files import numbered_jsonl

FILES = Files("humaneval", {"HumanEval.jsonl.gz":
                            "https://raw.githubusercontent.com/openai/human-eval/master/data/HumanEval.jsonl.gz"})
STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
KS = (1, 10, 100)


@dataclass
class Problem:
    id: str
    prompt: str
    entry_point: str
    test: str
    canonical_solution: str


def to_problem(row):
    fields = [row[k] for k in ("task_id", "prompt", "entry_point", "test", "canonical_solution")]
    if not all(isinstance(f, str) for f in fields):
        raise ValueError("task_id, prompt, entry_point, test and canonical_solution must be strings")
    return Problem(*fields)


def read_problems(settings):
    return settings.questions(read_task_rows(FILES, "HumanEval.jsonl.gz", to_problem, settings))


def program(problem, completion):
    """The program the release runs for one completion."""
    return f"{problem.prompt}{completion}\n{problem.test}\ncheck({problem.entry_point})\n"

# ---------------------------------------------------------------------------------------------------------- pass@k


def pass_at_k(n, c, k):
    """The unbiased estimate of pass@k from n samples of which c are correct: 1 - C(n - c, k) / C(n, k), computed
    as a product of ratios (no huge binomials): C(n - c, k) / C(n, k) = prod_{i = n - c + 1}^{n} (1 - k / i)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n and 0 <= c <= n (n {n}, c {c})")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss

# --------------------------------------------------------------------------------------------- completions to score


def to_sample(row):
    if not isinstance(row["task_id"], str) or not isinstance(row["completion"], str):
        raise ValueError("task_id and completion must be strings")
    return row["task_id"], row["completion"]


def read_samples(path, problems):
    """{task_id: [completion, ...]} from a samples file, for the problems being scored (rows of other problems are
    ignored, so a file for all 164 scores a --limit run); an unknown task_id or a problem without a sample is one
    line naming the file."""
    numbered = list(numbered_jsonl(path))
    rows = convert_rows(path, numbered, to_sample)
    known = set(p.id for p in problems)
    samples = {p.id: [] for p in problems}
    for (line, _), (task_id, completion) in zip(numbered, rows):
        if task_id in known:
            samples[task_id].append(completion)
        elif not task_id.startswith("HumanEval/"):
            raise ValueError(f"{path}:{line}: task_id {task_id!r} is not a HumanEval problem")
    missing = [task_id for task_id, completions in samples.items() if not completions]
    if missing:
        raise ValueError(f"{path} has no completion for {missing[0]}" + (f" and {len(missing) - 1} more problems"
                         if len(missing) > 1 else "") + ": every problem scored needs one (or set --limit)")
    return samples

# ------------------------------------------------------------------------------------------------------ generation


def cut(text, stop):
    """(text before its first stop sequence, whether one was found)."""
    at = min((text.find(s) for s in stop if s in text), default=-1)
    return (text[:at], True) if at >= 0 else (text, False)


@torch.inference_mode()
def sample(scorer, prompt, n, temperature, max_new_tokens, generator):
    """n completions of one prompt sampled at a temperature with model.generate_tokens (a batch of n), each
    ending at EOT or cut before its first stop sequence; -> [(completion, whether it stopped)]."""
    ids = torch.tensor([prompt] * n, device=scorer.device)
    rows, done = [[] for _ in range(n)], [None] * n
    with scorer.autocast:
        sample = sampler(SamplingParams(temperature=temperature), n, scorer.device, generator)
        for token in scorer.model.generate_tokens(ids, max_new_tokens, sample, vocab_limit=scorer.tok.vocab_size):
            for i, t in enumerate(token[:, 0].tolist()):
                if done[i] is None:
                    if t == scorer.tok.eot:
                        done[i] = (scorer.tok.decode(rows[i]), True)
                        continue
                    rows[i].append(t)
                    text, stopped = cut(scorer.tok.decode(rows[i]), STOP)
                    if stopped:
                        done[i] = (text, True)
            if all(d is not None for d in done):
                break
    return [d if d is not None else (scorer.tok.decode(r), False) for d, r in zip(done, rows)]


def generate(scorer, problems, settings):
    """{task_id: [completion, ...]} and how many ran to max_new_tokens without stopping: greedy (scorer.generate)
    at temperature 0 with one sample, else num_samples sampled completions per problem."""
    n, temperature = settings.num_samples, settings.temperature
    prompts = [scorer.encode(p.prompt)[-(scorer.block_size - settings.max_new_tokens):] for p in problems]
    if n == 1 and temperature == 0:
        out = scorer.generate(prompts, settings.max_new_tokens, STOP, desc="humaneval")  # batched across problems
        # stopped unless it used the whole budget (counted by re-encoding the text: near enough for a note)
        pairs = [[(text, len(scorer.encode(text)) < settings.max_new_tokens)] for text in out]
    else:
        generator = torch.Generator(scorer.device).manual_seed(settings.fewshot_seed)
        pairs = [sample(scorer, ids, n, temperature, settings.max_new_tokens, generator)
                 for ids in tqdm(prompts, desc="humaneval", leave=False)]
    unstopped = sum(not stopped for row in pairs for _, stopped in row)
    return {p.id: [text for text, _ in row] for p, row in zip(problems, pairs)}, unstopped

# ------------------------------------------------------------------------------------------------------------- task


def score(problems, samples, workers, limits=Limits()):
    """Run every completion of every problem in the sandbox; one record per problem (its completions, each one's
    outcome, c of n correct, pass@k for each k in KS up to the smallest n)."""
    jobs = [(p, completion) for p in problems for completion in samples[p.id]]
    with tqdm(total=len(jobs), desc="humaneval: running", leave=False) as bar:
        outcomes = iter(run_programs([program(p, c) for p, c in jobs], limits, workers, bar.update))
    ks = [k for k in KS if k <= min((len(samples[p.id]) for p in problems), default=1)]
    records = []
    for p in problems:
        ran = [next(outcomes) for _ in samples[p.id]]
        n, c = len(ran), sum(o.passed for o in ran)
        records.append({"id": p.id, "n": n, "correct": c, "completions": samples[p.id],
                        "status": [o.status for o in ran], **{f"pass@{k}": pass_at_k(n, c, k) for k in ks}})
    return records, [f"pass@{k}" for k in ks]


class HumanEval:
    name = "humaneval"

    def run(self, scorer, settings):
        start = time.time()
        check_sandbox()  # before any generation: a machine that cannot contain the programs runs none
        problems = read_problems(settings)
        if settings.samples:
            samples, unstopped = read_samples(settings.samples, problems), 0
        else:
            samples, unstopped = generate(scorer, problems, settings)
        workers = settings.sandbox_workers or os.cpu_count() or 1
        run_start = time.time()
        records, metrics = score(problems, samples, workers)
        n_programs = sum(r["n"] for r in records)
        timed_out = sum(s.startswith("timed out") for r in records for s in r["status"])
        how = (f"completions from {settings.samples}" if settings.samples else
               "greedy" if settings.num_samples == 1 and settings.temperature == 0 else
               f"{settings.num_samples} samples per problem at temperature {settings.temperature}")
        notes = [how, f"{n_programs} programs run in the sandbox in {time.time() - run_start:.1f} s, "
                      f"{workers} at a time",
                 f"{timed_out} programs timed out (scored as failures)" if timed_out else "",
                 f"{unstopped} completions reached max_new_tokens without a stop sequence" if unstopped else ""]
        return task_result(self.name, 0, records, metrics, start, notes)


TASK = HumanEval()
