"""Post-training through train.py end to end (the pieces are tested in test_chat_format.py, test_posttrain_data.py,
test_dpo.py and test_chat.py): the masked SFT loss over the whole global batch whatever the accumulation or the
number of processes, SFT that makes chat.py answer as trained, and DPO against a frozen reference."""
import json
import os
from dataclasses import asdict

import pytest
import torch

from model import GPT, GPTConfig
from nanogpt.checkpoint import read_checkpoint_file, save_checkpoint
from nanogpt.posttrain import pair_logprobs
from nanogpt.tokenizer import chat_spec
from tests.conftest import run_script

pytestmark = pytest.mark.usefixtures("seed")
QA = [("What is the capital of France?", "Paris."), ("Name a primary colour.", "Red, for one."),
      ("How many legs has a spider?", "Eight legs."), ("Say hello in Spanish.", "Hola!")]
SMALL = ["--n_layer=2", "--n_embd=64", "--n_head=2", "--block_size=64", "--compile=False", "--device=cpu",
         "--dtype=float32", "--log_interval=1", "--eval_iters=1", "--warmup_iters=0", "--min_lr=0"]


def write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def prepare(tmp_path, name, records, *extra):
    data = tmp_path / "data"
    run_script("data/chat/prepare.py", "--input", write_jsonl(tmp_path / f"{name}.jsonl", records),
               "--out_dir", str(data / name), "--block_size", "64", "--val_fraction", "0.25", *extra)
    return str(data)


def init_checkpoint(path, spec=None):
    """A fixed GPT-2-BPE starting model (padded vocabulary), so runs of different shapes start from the same weights."""
    cfg = GPTConfig(n_layer=2, n_embd=64, n_head=2, block_size=64, vocab_size=50304)
    save_checkpoint({"model": GPT(cfg).state_dict(), "model_args": asdict(cfg), "tokenizer": spec or {"kind": "gpt2"}},
                    str(path))
    return str(path)


def losses(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["iter"]: r for r in rows if "loss" in r}


def test_masked_loss_is_the_global_batch_mean_under_accumulation_and_ddp(tmp_path):
    # conversations of very different lengths: micro-batches count very different numbers of trained tokens
    records = [{"messages": [{"role": "user", "content": q * (1 + i % 3)},
                             {"role": "assistant", "content": a * (i % 4 + 1)}]}
               for i, (q, a) in enumerate(QA * 6)]
    data = prepare(tmp_path, "chat", records, "--open_rows", "0")
    init = init_checkpoint(tmp_path / "init.pt", chat_spec())
    common = [*SMALL, f"--data_root={data}", "--dataset=chat", f"--init_from={init}", "--max_iters=3",
              "--eval_interval=100", "--learning_rate=1e-3"]
    run_script("train.py", *common, "--batch_size=8", f"--out_dir={tmp_path}/one")
    run_script("train.py", *common, "--batch_size=2", "--gradient_accumulation_steps=4", f"--out_dir={tmp_path}/acc")
    run_script("-m torch.distributed.run --standalone --nproc_per_node=2 train.py", *common, "--batch_size=2",
               "--gradient_accumulation_steps=2", f"--out_dir={tmp_path}/ddp", env={"OMP_NUM_THREADS": "1"})
    one = losses(tmp_path / "one")
    assert one[1]["trained_tokens"] < 8 * 64  # masked data: the log says how many tokens were trained
    for name in ("acc", "ddp"):
        other = losses(tmp_path / name)
        for it in (1, 2, 3):
            assert abs(other[it]["loss"] - one[it]["loss"]) < 1e-5 * one[it]["loss"], (name, it)
            assert other[it]["trained_tokens"] == one[it]["trained_tokens"]


def test_masked_loss_equals_a_hand_computed_float64_mean_over_assistant_tokens(tmp_path):
    records = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q},
                             {"role": "assistant", "content": a}]} for q, a in QA]
    data = prepare(tmp_path, "chat", records, "--open_rows", "0", "--val_fraction", "0.5")
    init = init_checkpoint(tmp_path / "init.pt", chat_spec())
    out = tmp_path / "out"
    run_script("train.py", *SMALL, f"--data_root={data}", "--dataset=chat", f"--init_from={init}", "--max_iters=0",
               "--batch_size=2", f"--out_dir={out}", "--eval_only=True")
    logged = json.loads(open(out / "metrics.jsonl").readline())["val_loss"]
    from nanogpt.loader import BatchLoader
    loader = BatchLoader([os.path.join(data, "chat")], "val", 2, 64, seed=1337 + 7)
    x, y = loader.next_batch()
    model = GPT(GPTConfig(**read_checkpoint_file(init)["model_args"])).double()
    model.load_state_dict(read_checkpoint_file(init)["model"])
    logits = model.logits(model(x)).double()
    picked = [(b, t) for b in range(2) for t in range(64) if y[b, t] >= 0]
    hand = sum(torch.logsumexp(logits[b, t], 0) - logits[b, t, y[b, t]] for b, t in picked) / len(picked)
    assert 0 < len(picked) < 2 * 64 and abs(logged - hand.item()) < 1e-5 * hand.item()


def test_sft_makes_chat_answer_as_trained(tmp_path):
    records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    data = prepare(tmp_path, "chat", records * 8, "--val_fraction", "0.1")
    out = tmp_path / "sft"
    run_script("train.py", *SMALL, f"--data_root={data}", "--dataset=chat", f"--out_dir={out}", "--batch_size=4",
               "--max_iters=150", "--eval_interval=150", "--learning_rate=3e-3")
    for question, answer in QA:
        reply = run_script("chat.py", f"--out_dir={out}", f"--prompt={question}", "--temperature=0",
                           "--max_new_tokens=20").stdout
        assert answer in reply, (question, reply)


def test_dpo_prefers_chosen_replies_and_keeps_its_reference_frozen(tmp_path):
    wrong = [a for _, a in QA[1:] + QA[:1]]  # each question's rejected reply: another question's answer
    pairs = [{"prompt": [{"role": "user", "content": q}], "chosen": a, "rejected": w}
             for (q, a), w in zip(QA * 6, wrong * 6)]
    data = prepare(tmp_path, "pairs", pairs)
    init = init_checkpoint(tmp_path / "init.pt", chat_spec())
    out = tmp_path / "dpo"
    run_script("train.py", *SMALL, f"--data_root={data}", "--dataset=pairs", f"--init_from={init}", "--batch_size=4",
               "--max_iters=30", "--eval_interval=30", "--learning_rate=1e-3", "--dpo_beta=0.5", f"--out_dir={out}")
    evals = [json.loads(line) for line in open(out / "metrics.jsonl") if "val_loss" in line]
    before, after = evals[0], evals[-1]
    assert before["val_loss"] == pytest.approx(0.6931, abs=1e-3)  # policy = reference: -log sigmoid(0)
    # the chosen-minus-rejected log-prob margin rose above the reference's, and with it the preference accuracy
    assert after["val_margin"] > 0.5 and after["val_accuracy"] > 0.5 > before["val_accuracy"]
    assert after["val_likelihood_accuracy"] >= before["val_likelihood_accuracy"]
    # the logged rewards are beta * (log pi - log pi_ref) with pi_ref the unchanged starting weights
    from nanogpt.loader import BatchLoader
    val = BatchLoader([os.path.join(data, "pairs")], "val", 4, 64, seed=1337 + 7)
    batch = val.next_batch()
    models = []
    for path in (out / "ckpt.pt", init):
        ckpt = read_checkpoint_file(str(path))
        m = GPT(GPTConfig(**ckpt["model_args"])).eval()
        m.load_state_dict(ckpt["model"])
        models.append(m)
    with torch.no_grad():
        policy, reference = (pair_logprobs(m, *batch) for m in models)
    chosen_reward = (0.5 * (policy[0] - reference[0])).mean().item()
    assert chosen_reward == pytest.approx(after["val_chosen_reward"], rel=1e-4, abs=1e-5)


def test_a_dpo_run_resumes_only_against_the_reference_it_started_from(tmp_path):
    pairs = [{"prompt": [{"role": "user", "content": q}], "chosen": a, "rejected": "No."} for q, a in QA * 4]
    data = prepare(tmp_path, "pairs", pairs)
    init = init_checkpoint(tmp_path / "init.pt", chat_spec())
    out = tmp_path / "dpo"
    common = [*SMALL, f"--data_root={data}", "--dataset=pairs", "--batch_size=4", "--eval_interval=2",
              f"--out_dir={out}"]
    run_script("train.py", *common, f"--init_from={init}", "--max_iters=2")
    assert len(read_checkpoint_file(str(out / "ckpt.pt"))["reference_fingerprint"]) == 64
    run_script("train.py", *common, "--init_from=resume", "--max_iters=4")  # the same reference: resumes
    ckpt = read_checkpoint_file(init)
    ckpt["model"]["wte.weight"][0, 0] += 1.0  # the reference replaced by other weights at the same path
    save_checkpoint(ckpt, init)
    refused = run_script("train.py", *common, "--init_from=resume", "--max_iters=6", check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert f"the DPO reference {init} is not the one this run started from" in refused.stderr.strip().splitlines()[-1]
