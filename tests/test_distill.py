"""Distillation (nanogpt/distill.py): the chunked losses against a hand-computed KL and a naive float64 reference
(values and gradients), and train.py's distill objective: its log, its records, a teacher of another tokenizer."""
import json
import math
import os
from dataclasses import asdict

import pytest
import torch

from model import GPT, GPTConfig
from nanogpt import distill
from nanogpt.checkpoint import read_checkpoint_file, save_checkpoint
from nanogpt.tokenizer import Tokenizer
from tests.conftest import TINY, assert_one_clear_line, run_script


class Head(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight, self.out_features = weight, weight.size(0)


class Frozen(torch.nn.Module):
    """A stand-in teacher: hidden states are the input rows themselves, then its head."""
    def __init__(self, weight, softcap):
        super().__init__()
        self.lm_head, self.config = Head(weight), GPTConfig(logit_softcap=softcap)

    def forward(self, h):
        return h


def states(h):
    """A stand-in student whose forward gives the states h and no balance loss."""
    return lambda x, with_balance: (h, torch.zeros((), dtype=h.dtype))


def test_kl_by_hand():
    """Two rows, vocabulary of 2, student logits [0, 1], teacher [1, 0], T = 2; the second row not counted."""
    eye = torch.eye(2, dtype=torch.float64)
    h_student = torch.tensor([[[0.0, 1.0], [5.0, -5.0]]], dtype=torch.float64)
    h_teacher = torch.tensor([[[1.0, 0.0], [-5.0, 5.0]]], dtype=torch.float64)
    ce, kl, _ = distill.distill_losses(states(h_student), Head(eye), 0.0, Frozen(eye, 0.0), h_teacher,
                                       torch.tensor([[1, -1]]), 2.0, 2)
    p_t = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]  # softmax([1, 0] / 2)
    p_s = p_t[::-1]                                                           # softmax([0, 1] / 2)
    assert kl.item() == pytest.approx(sum(t * math.log(t / s) for t, s in zip(p_t, p_s)), rel=1e-12)
    assert ce.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-12)  # -log softmax([0, 1])[1]
    assert distill.mixed_loss(ce, kl, 0.25, 2.0).item() == pytest.approx(0.75 * ce.item() + 0.25 * 4 * kl.item())


def naive(h_s, w_s, h_t, w_t, y, temperature, softcaps, vocab):
    """Whole logits, probabilities by exp / sum, the KL term by term."""
    def cap(z, c):
        return c * torch.tanh(z / c) if c else z
    s, t = cap(h_s @ w_s.T, softcaps[0]), cap(h_t @ w_t.T, softcaps[1])[:, :vocab]
    ce = sum(torch.logsumexp(s[i], 0) - s[i, y[i]] for i in range(len(y)) if y[i] >= 0)
    p_s = torch.exp(s[:, :vocab] / temperature)
    p_s = p_s / p_s.sum(-1, keepdim=True)
    p_t = torch.exp(t / temperature)
    p_t = p_t / p_t.sum(-1, keepdim=True)
    kl = sum((p_t[i] * torch.log(p_t[i] / p_s[i])).sum() for i in range(len(y)) if y[i] >= 0)
    return ce, kl


@pytest.mark.parametrize("softcaps", [(0.0, 0.0), (3.0, 5.0)])
def test_chunked_losses_and_gradients_match_naive_float64(seed, monkeypatch, softcaps):
    monkeypatch.setattr(distill, "LOSS_CHUNK_ELEMENTS", 7 * 24)  # 7 rows a chunk: ragged chunks over 3 x 11 rows
    vocab, d_s, d_t = 21, 8, 12  # the student's head has 3 padded rows past the vocabulary
    h_s = torch.randn(3, 11, d_s, dtype=torch.float64, requires_grad=True)
    w_s = torch.randn(24, d_s, dtype=torch.float64, requires_grad=True)
    h_t, w_t = torch.randn(3, 11, d_t, dtype=torch.float64), torch.randn(vocab, d_t, dtype=torch.float64)
    y = torch.randint(0, vocab, (3, 11))
    y[0, :4] = -1  # SFT-style masked prompt positions
    ce, kl, _ = distill.distill_losses(states(h_s), Head(w_s), softcaps[0], Frozen(w_t, softcaps[1]), h_t, y, 1.7,
                                       vocab)
    ref_ce, ref_kl = naive(h_s.flatten(0, 1), w_s, h_t.flatten(0, 1), w_t, y.flatten(), 1.7, softcaps, vocab)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kl, ref_kl, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(distill.mixed_loss(ce, kl, 0.3, 1.7), (h_s, w_s))
    ref_grads = torch.autograd.grad(distill.mixed_loss(ref_ce, ref_kl, 0.3, 1.7), (h_s, w_s))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    assert kl > 0


def test_identical_teacher_gives_zero_kl(seed):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=65, n_layer=1, n_embd=16, n_head=2, block_size=16)).double()
    x = torch.randint(0, 65, (2, 16))
    ce, kl, balance = distill.distill_losses(model, model.lm_head, 0.0, model, x, x, 3.0, 65)
    assert abs(kl.item()) < 1e-12 and balance.item() == 0.0  # no MoE: no balance loss
    torch.testing.assert_close(ce, model(x, x)[0])  # the data term is the model's own loss


def test_an_moe_student_keeps_its_balance_loss(seed):
    """The distillation objective adds the student's MoE balance loss as the plain objective does: the same value
    as the next-token path's on the same batch, and a gradient on the router."""
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=65, n_layer=2, n_embd=16, n_head=2, block_size=16, n_expert=4, n_expert_active=2,
                    n_dense_layers=1, moe_hidden=16, moe_aux_alpha=0.1)
    student, teacher = GPT(cfg).double().train(), GPT(GPTConfig(vocab_size=65, n_layer=1, n_embd=8, n_head=2,
                                                                block_size=16)).double()
    x = torch.randint(0, 65, (2, 16))
    ce, kl, balance = distill.distill_losses(student, student.lm_head, 0.0, teacher, x, x, 2.0, 65)
    assert balance.item() > 0
    torch.testing.assert_close(balance, student(x, x)[1])
    router = next(p for n, p in student.named_parameters() if n.endswith("router.weight"))
    assert torch.autograd.grad(balance, router)[0].abs().sum() > 0

# ----------------------------------------------------------------------------------------------------- train.py


def save_model(path, tokenizer_spec, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = GPTConfig(**dict(dict(vocab_size=65, n_layer=2, n_embd=32, n_head=2, block_size=32), **overrides))
    save_checkpoint({"model": GPT(cfg).state_dict(), "model_args": asdict(cfg), "tokenizer": tokenizer_spec}, path)
    return path


def test_distill_run_and_bad_teacher(data_root, tmp_path):
    spec = json.load(open(os.path.join(data_root, "shakespeare_char", "tokenizer.json")))
    teacher = save_model(str(tmp_path / "teacher.pt"), spec, n_layer=3, n_embd=48)
    common = [*TINY, f"--data_root={data_root}", "--n_embd=16", "--eval_interval=3", "--max_iters=3"]
    result = run_script("train.py", *common, f"--teacher_from={teacher}", "--distill_weight=0.7",
                        f"--out_dir={tmp_path / 'student'}")
    assert "0.3 CE + 0.7 x 2^2 KL" in result.stdout
    rows = [json.loads(line) for line in open(tmp_path / "student" / "metrics.jsonl")]
    assert all(r["kl"] > 0 for r in rows if "kl" in r) and any("val_kl" in r for r in rows)
    ckpt = read_checkpoint_file(str(tmp_path / "student" / "ckpt.pt"))
    assert ckpt["teacher_from"] == teacher and ckpt["objective"] == "next_token"
    with pytest.raises(ValueError, match="not the one this run started from"):  # a resume with a changed teacher
        distill.load_teacher(teacher, Tokenizer(spec), 32, "cpu", "0" * 64)
    other = save_model(str(tmp_path / "bpe.pt"), {"kind": "gpt2"}, vocab_size=50304)
    bad = run_script("train.py", *common, f"--teacher_from={other}", f"--out_dir={tmp_path / 'bad'}", check=False)
    assert_one_clear_line(bad, "the teacher", "GPT-2", "character-level", "distill from a teacher trained with")
    assert not os.path.exists(tmp_path / "bad")
