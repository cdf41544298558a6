"""eval.py's tasks on the weights being trained, at every evaluation of train.py (eval_tasks, eval_task_limit): the
benchmarks on the training curve, as nanochat tracks CORE during pretraining.

Each task runs with eval.py's protocol on the first eval_task_limit questions (the same ones every time), on the
training model in eval mode with the run's autocast. Under DDP every rank holds the whole model: rank r scores
questions r, r + world, ... and the per-question records are gathered (all_gather_object) so every rank has the
whole set. Under FSDP2 a forward pass all-gathers each unit's shards in step on every rank, so every rank scores
every question (same calls, same results) and nothing is gathered. The values logged are the per-question means
(acc, acc_norm, mc2, exact_match_*, pass@k, pct_stereotype, ...) and, for multiple choice, macro-F1; the bias
scores per category and the intervals are eval.py's. Generation gets max_new_tokens = min(256, block_size / 2).
"""
import time

import requests
import torch
import torch.distributed as dist

from nanogpt.download import DownloadError
from nanogpt.parallel import finish
from nanogpt.scoring import Scorer
from nanogpt.tasks import TASKS
from nanogpt.tasks.common import Settings, task_result, with_macro_f1

NOT_IN_TRAINING = ("bpb",)  # the run's own val loss is its bits per byte


def check_names(spec):
    """The task names of an eval_tasks setting; raises ValueError naming the unknown ones."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in TASKS or n in NOT_IN_TRAINING]
    if unknown:
        raise ValueError(f"eval_tasks: unknown tasks {unknown}; choose from "
                         f"{', '.join(n for n in TASKS if n not in NOT_IN_TRAINING)}")
    return names


def gathered(records, world):
    """Every rank's records, back in question order (rank r held questions r, r + world, ...)."""
    if world == 1:
        return records
    parts = [None] * world
    dist.all_gather_object(parts, records)
    return [parts[i % world][i // world] for i in range(sum(map(len, parts)))]


def per_question_metrics(records):
    """The numeric fields every record has that are per-question metric values (not ids, scores or counts)."""
    skip = {"id", "gold", "prediction", "prediction_norm", "n", "correct", "tokens", "bytes", "nll", "biased",
            "unknown"}
    keys = [k for k, v in records[0].items() if k not in skip and isinstance(v, (int, float))
            and not isinstance(v, bool)]
    return [k for k in keys if all(isinstance(r.get(k), (int, float)) for r in records)]


@torch.no_grad()
def run_tasks(model, tok, names, limit, data_dir, place, autocast, batch_size=16):
    """{"<task>/<metric>": value, ..., "tasks_questions": questions scored, "tasks_seconds": wall seconds} of the
    named tasks on the training model."""
    start = time.time()
    split = place.mode == "ddp" and place.world_size > 1  # FSDP2: every rank runs every question (see above)
    rank, world = (place.rank, place.world_size) if split else (0, 1)
    settings = Settings(data_dir=data_dir, limit=limit, max_new_tokens=min(256, model.config.block_size // 2),
                        rank=rank, world=world)
    scorer = Scorer(model, tok, place.device, autocast, batch_size)
    was_training = model.training
    model.eval()
    out, questions = {}, 0
    try:
        for name in names:
            t = time.time()
            try:
                result = TASKS[name].run(scorer, settings)
            except (OSError, ValueError, RuntimeError, DownloadError, requests.RequestException) as e:
                raise type(e)(f"{name}: {e}") from None
            records = gathered(result["records"], world)
            questions += len(records)
            if not records:
                continue
            result = task_result(name, result["shots"], records, per_question_metrics(records), t)
            if "prediction" in records[0]:
                result = with_macro_f1(result)
            out.update({f"{name}/{m}": v for m, v in result["metrics"].items()})
    finally:
        model.train(was_training)
    out["tasks_questions"] = questions  # over all ranks: eval_task_limit per task, whatever the world size
    out["tasks_seconds"] = time.time() - start
    return out


def metrics_or_stop(model, tok, names, limit, data_dir, place, autocast):
    """run_tasks' metrics; a task that cannot run (its files missing or malformed, no sandbox) stops the run with
    one line on every rank (it fails at the first evaluation, iteration 0, before any training is lost)."""
    try:
        return run_tasks(model, tok, names, limit, data_dir, place, autocast)
    except (OSError, ValueError, RuntimeError, DownloadError, requests.RequestException) as e:
        finish(f"eval_tasks: {e}")
