"""The benchmark tasks, one module each; TASKS maps every --tasks name of eval.py to its task (anything with a name
and a run(scorer, settings) that returns tasks.common.task_result's dict). MMLU's own 5-shot runner is
eval_mmlu.py."""
from nanogpt.tasks import (arc, arith, bbq, bpb, crows_pairs, gsm8k, hellaswag, humaneval, mmlu_cot, truthfulqa,
                          winogrande)

TASKS = {"hellaswag": hellaswag.TASK, "arc_easy": arc.EASY, "arc_challenge": arc.CHALLENGE,
         "winogrande": winogrande.TASK, "truthfulqa_mc1": truthfulqa.MC1, "truthfulqa_mc2": truthfulqa.MC2,
         "gsm8k": gsm8k.TASK, "mmlu_cot": mmlu_cot.TASK, "humaneval": humaneval.TASK,
         "crows_pairs": crows_pairs.TASK, "bbq": bbq.TASK, "bpb": bpb.TASK, "arith": arith.TASK}
