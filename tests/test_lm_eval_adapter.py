"""tools/lm_eval_adapter.py: an lm-evaluation-harness task on local files through the adapter (lm-eval's own command
line and file-based dataset loading, hub and network off), item by item against our own ARC scorer; rolling
log-likelihoods against lm-eval's own window code, and generation against the model's own generate. Skipped when
lm-eval is not installed: it is an optional dependency (`pip install lm-eval==0.4.13`)."""
import glob
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from test_eval_tasks import GPT2, arc_rows, jsonl, text, tiny_gpt2_checkpoint

from nanogpt.scoring import load_scorer
from nanogpt.tasks import arc
from nanogpt.tasks.common import Settings

pytest.importorskip("lm_eval")

# lm-eval's arc_easy.yaml, reading a local JSON-lines file in the Hugging Face dataset's layout
TASK_YAML = """task: nanogpt_arc_local
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {path}
output_type: multiple_choice
test_split: test
num_fewshot: 0
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def hub_layout(row):
    """An ARC row as the Hugging Face copy lm-eval reads holds it."""
    choices = row["question"]["choices"]
    return {"id": row["id"], "question": row["question"]["stem"], "answerKey": row["answerKey"],
            "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]}}


def test_an_lm_eval_task_through_the_adapter_matches_our_scorer_item_by_item(tmp_path, seed):
    torch.manual_seed(seed)
    rows = arc_rows(random.Random(seed), 12)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "ARC-Easy-Test.jsonl").write_bytes(jsonl(rows))
    (tmp_path / "hub.jsonl").write_bytes(jsonl([hub_layout(r) for r in rows]))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "arc_local.yaml").write_text(TASK_YAML.format(path=tmp_path / "hub.jsonl"))
    out = tiny_gpt2_checkpoint(tmp_path / "out")
    cmd = [sys.executable, "tools/lm_eval_adapter.py", "--model", "nanogpt", "--model_args", f"out_dir={out}",
           "--tasks", "nanogpt_arc_local", "--include_path", str(tmp_path / "tasks"), "--log_samples",
           "--output_path", str(tmp_path / "lm_eval"), "--batch_size", "3", "--device", "cpu"]
    env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf")}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    [samples] = glob.glob(str(tmp_path / "lm_eval" / "*" / "samples_nanogpt_arc_local_*.jsonl"))
    theirs = sorted((json.loads(line) for line in open(samples)), key=lambda s: s["doc_id"])

    scorer, _ = load_scorer(out, "cpu", batch_size=5)
    ours = arc.EASY.run(scorer, Settings(data_dir=str(tmp_path / "data"), num_fewshot=0))["records"]
    assert len(theirs) == len(ours) == 12
    for t, o in zip(theirs, ours):
        lls = [float(ll) for ll, _ in t["filtered_resps"]]
        assert lls == pytest.approx(o["scores"], abs=1e-4)
        top = sorted(lls)[-2:]
        if top[1] - top[0] > 1e-3:  # not a near tie: the same choice
            assert (t["acc"], t["acc_norm"]) == (o["acc"], o["acc_norm"])
            assert max(range(len(lls)), key=lls.__getitem__) == o["prediction"]


def test_rolling_loglikelihood_and_generation_through_the_adapter(tmp_path, seed):
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from tools import lm_eval_adapter

    torch.manual_seed(seed)
    rng = random.Random(seed)
    lm = lm_eval_adapter.NanoGPT(out_dir=tiny_gpt2_checkpoint(tmp_path / "out", block_size=32), device="cpu",
                                 batch_size=4)
    model = lm.scorer.model
    texts = [text(rng, rng.choice([3, 20, 70])) for _ in range(5)]
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)])
    for t, total in zip(texts, got):
        want = 0.0
        for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(GPT2.encode(t), GPT2.eot, 32, 1)):
            inputs = (ctx + cont)[-33:][:-1]
            with torch.no_grad():
                lp = model.logits(model(torch.tensor([inputs])))[0].log_softmax(-1)
            want += sum(lp[len(inputs) - len(cont) + j, token].item() for j, token in enumerate(cont))
        assert total == pytest.approx(want, abs=1e-3)

    prompts = [text(rng, rng.randint(1, 8)) for _ in range(5)]
    stop = ["the", "\n"]
    requests = [Instance("generate_until", {}, (p, {"until": stop, "max_gen_toks": 8, "do_sample": False}), i)
                for i, p in enumerate(prompts)]
    for prompt, out in zip(prompts, lm.generate_until(requests)):
        ids = GPT2.encode(prompt)
        with torch.no_grad():
            new = model.generate(torch.tensor([ids]), 8)[0, len(ids):].tolist()
        want = GPT2.decode(new[:new.index(GPT2.eot)] if GPT2.eot in new else new)  # EOT ends a generation
        cuts = [want.index(s) for s in stop if s in want]
        assert out == want[:min(cuts, default=len(want))]
    with pytest.raises(ValueError, match="greedily only"):
        lm.generate_until([Instance("generate_until", {}, ("x", {"do_sample": True}), 0)])
    none = [Instance("generate_until", {}, (p, {"until": stop, "max_gen_toks": 0}), i) for i, p in enumerate(prompts)]
    assert lm.generate_until(none) == [""] * len(prompts)  # no tokens asked for: the empty continuation
