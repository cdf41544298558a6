"""tools/merge.py: each method against merges worked out by hand on small float64 tensors, SLERP's endpoints and
midpoint, DARE's expectation, TIES's sign election, and whole checkpoints (refusals, the command)."""
import math
import os
from dataclasses import asdict

import pytest
import torch

from model import GPT, GPTConfig
from nanogpt.checkpoint import TRAINING_ONLY, architecture_for, check_compatible, load_model, save_checkpoint
from nanogpt.tokenizer import chat_spec
from tests.conftest import run_script
from tools import merge


def f64(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_linear_and_task_arithmetic_by_hand(seed):
    assert torch.equal(merge.linear([f64(1, 2), f64(3, -2)], [1, 3]), f64(2.5, -1.0))  # (1+9)/4, (2-6)/4
    base, a, b = f64(1, 1), f64(2, 0), f64(1, 3)
    assert torch.equal(merge.task_arithmetic(base, [a, b], [0.5, 1.0]), f64(1.5, 2.5))  # 1 + .5*1 + 0, 1 - .5 + 2
    xs = [torch.randn(3, 5, dtype=torch.float64) for _ in range(3)]
    w = torch.rand(3, dtype=torch.float64).tolist()
    assert torch.allclose(merge.linear(xs, w), sum(wi * x for wi, x in zip(w, xs)) / sum(w), atol=1e-15)


def test_slerp_endpoints_midpoint_and_parallel_fallback(seed):
    a, b = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    assert torch.allclose(merge.slerp(a, b, 0.0), a, atol=1e-12)
    assert torch.allclose(merge.slerp(a, b, 1.0), b, atol=1e-12)
    angle = torch.arccos((a * b).sum() / (a.norm() * b.norm()))
    # at t = 1/2 the weights are sin(angle/2) / sin(angle) = 1 / (2 cos(angle/2)) for both
    assert torch.allclose(merge.slerp(a, b, 0.5), (a + b) / (2 * torch.cos(angle / 2)), atol=1e-12)
    x, y = f64(1, 0), f64(0, 2)  # orthogonal: a quarter circle between norm 1 and norm 2
    assert torch.allclose(merge.slerp(x, y, 0.5), f64(math.sqrt(0.5), math.sqrt(2)), atol=1e-12)
    t = torch.rand(()).item()
    assert torch.allclose(merge.slerp(a, 2 * a, t), (1 - t) * a + t * 2 * a, atol=1e-12)  # parallel: linear


def test_ties_trims_elects_by_mass_and_averages_the_agreeing(seed):
    base = torch.randn(4, dtype=torch.float64)
    taus = [f64(3, -1, 0.5, -2), f64(-1, -4, 0.2, 2), f64(-1, 2, 0, 1)]
    models = [base + tau for tau in taus]
    # keep 3 of 4 per vector: 0.5 and 0.2 go. Trimmed sums 1, -3, 0, 1: entry 0 is elected + by mass although two
    # of three vectors are negative there; the means of the agreeing entries are 3, (-1-4)/2, none, (2+1)/2
    expected = base + f64(3, -2.5, 0, 1.5)
    assert torch.allclose(merge.ties(base, models, [1, 1, 1], density=0.75), expected, atol=1e-12)
    # weights scale the votes and the mean: with 4x on the second vector entry 0 turns negative, -(4+1)/5
    weighted = merge.ties(base, models, [1, 4, 1], density=0.75)
    assert torch.allclose(weighted[0] - base[0], torch.tensor(-1.0, dtype=torch.float64), atol=1e-12)


def test_dare_keeps_the_expectation(seed):
    c, density, n = torch.randn(()).item(), torch.empty(()).uniform_(0.1, 0.9).item(), 200_000
    generator = torch.Generator().manual_seed(seed)
    dropped = merge.drop_and_rescale(torch.full((n,), c, dtype=torch.float64), density, generator)
    assert set(dropped.unique().tolist()) <= {0.0, c / density}
    sigma = abs(c) * math.sqrt((1 - density) / density / n)  # the standard deviation of the mean
    assert abs(dropped.mean().item() - c) < 5 * sigma
    base, a, b = (torch.randn(50, dtype=torch.float64) for _ in range(3))
    again = [merge.dare(base, [a, b], [0.5, 0.5], density, torch.Generator().manual_seed(seed)) for _ in range(2)]
    assert torch.equal(again[0], again[1])  # seeded
    # keeping everything, DARE is task arithmetic and DARE-TIES is TIES without trimming
    assert torch.allclose(merge.dare(base, [a, b], [0.3, 0.7], 1.0, generator),
                          merge.task_arithmetic(base, [a, b], [0.3, 0.7]), atol=1e-12)
    assert torch.allclose(merge.dare(base, [a, b], [1, 1], 1.0, generator, with_ties=True),
                          merge.ties(base, [a, b], [1, 1], 1.0), atol=1e-12)


CHARS = "abcdefghijk"


def tiny_checkpoint(path, **overrides):
    cfg = GPTConfig(**dict(dict(block_size=16, vocab_size=11, n_layer=2, n_embd=16, n_head=2), **overrides))
    ckpt = {"model": GPT(cfg).state_dict(), "model_args": asdict(cfg), "tokenizer": {"kind": "char", "chars": CHARS}}
    os.makedirs(path, exist_ok=True)
    save_checkpoint(ckpt, os.path.join(path, "ckpt.pt"))
    return ckpt


def test_checkpoints_merge_and_mismatches_are_named(tmp_path, seed):
    a, b = tiny_checkpoint(tmp_path / "a"), tiny_checkpoint(tmp_path / "b")
    merged = merge.merged_checkpoint("linear", [str(tmp_path / "a"), str(tmp_path / "b")])
    for name, tensor in merged["model"].items():
        assert torch.allclose(tensor, (a["model"][name].double() + b["model"][name].double()).float() / 2, atol=1e-7)
    tiny_checkpoint(tmp_path / "deeper", n_layer=3)
    with pytest.raises(ValueError, match="n_layer 2 vs 3"):
        merge.merged_checkpoint("linear", [str(tmp_path / "a"), str(tmp_path / "deeper")])
    other = tiny_checkpoint(tmp_path / "vocab")
    other["tokenizer"] = {"kind": "char", "chars": CHARS.upper()}
    save_checkpoint(other, str(tmp_path / "vocab" / "ckpt.pt"))
    with pytest.raises(ValueError, match="another vocabulary") as error:
        merge.merged_checkpoint("linear", [str(tmp_path / "a"), str(tmp_path / "vocab")])
    assert "differ at id 0" in str(error.value)


def test_vocabulary_differences_name_what_differs():
    plain, chat = {"kind": "gpt2"}, chat_spec()
    assert "special tokens none vs" in merge.vocabulary_difference(plain, chat)  # both 'GPT-2 BPE' before
    assert "<|user_start|>" in merge.vocabulary_difference(plain, chat)
    assert merge.vocabulary_difference({"kind": "char", "chars": "ab"}, {"kind": "char", "chars": "abc"}) == \
        "2 characters vs 3"
    assert merge.vocabulary_difference(plain, {"kind": "char", "chars": "ab"}) == "a gpt2 tokenizer vs a char one"


@pytest.mark.parametrize("method, extra, unused", [
    ("slerp", ["--weights=0.5,0.5"], "--weights"), ("linear", ["--base=BASE"], "--base"),
    ("linear", ["--t=0.3", "--density=0.5"], "--density, --t"), ("ties", ["--base=BASE", "--t=0.3"], "--t"),
])
def test_a_setting_the_method_does_not_use_is_refused(tmp_path, method, extra, unused):
    for name in ("base", "a", "b"):
        tiny_checkpoint(tmp_path / name)
    extra = [e.replace("BASE", str(tmp_path / "base")) for e in extra]
    bad = run_script("tools/merge.py", f"--method={method}", f"--models={tmp_path / 'a'},{tmp_path / 'b'}",
                     *extra, f"--out_dir={tmp_path / 'x'}", check=False)
    assert bad.returncode == 2 and f"--method={method} does not use {unused}" in bad.stderr, bad.stderr
    assert not (tmp_path / "x").exists()


def test_one_rule_for_the_same_architecture_in_resume_and_merge(tmp_path, seed):
    """Training-only fields may differ and resolved defaults compare equal, for check_compatible and merge alike;
    an architecture field may not, for either."""
    base = dict(block_size=16, vocab_size=11, n_layer=2, n_embd=16, n_head=2, mlp="relu2", n_expert=4,
                moe_hidden=32, attn_pattern="LG", local_window=8)
    a = tiny_checkpoint(tmp_path / "a", **base)
    same = dict(base, block_size=32, dropout=0.1, moe_bias_gamma=0.0, moe_aux_alpha=0.0, zero_init_proj=True,
                mlp_hidden=64, attn_pattern="LGLG")  # 64 = 4 * n_embd: relu2's default width, written out
    assert set(TRAINING_ONLY) <= set(same)
    tiny_checkpoint(tmp_path / "same", **same)
    check_compatible(a, GPTConfig(**same))
    merge.merged_checkpoint("linear", [str(tmp_path / "a"), str(tmp_path / "same")])
    args = architecture_for(dict(same, n_layer=3), set(), a)
    assert args["moe_aux_alpha"] == 0.0 and args["block_size"] == 32 and args["n_layer"] == 2  # settings: training
    tiny_checkpoint(tmp_path / "wider", **dict(base, moe_hidden=48))
    with pytest.raises(ValueError, match="moe_hidden"):
        check_compatible(a, GPTConfig(**dict(base, moe_hidden=48)))
    with pytest.raises(ValueError, match="moe_hidden 32 vs 48"):
        merge.merged_checkpoint("linear", [str(tmp_path / "a"), str(tmp_path / "wider")])


def test_merge_command(tmp_path, seed):
    for name in ("base", "a", "b"):
        tiny_checkpoint(tmp_path / name)
    out = tmp_path / "merged"
    result = run_script("tools/merge.py", "--method=ties", f"--models={tmp_path / 'a'},{tmp_path / 'b'}",
                        f"--base={tmp_path / 'base'}", "--weights=0.5,0.5", f"--out_dir={out}")
    assert "merged 2 models (ties)" in result.stdout
    model, tokenizer, ckpt = load_model(str(out))
    assert ckpt["config"]["merge"]["method"] == "ties" and tokenizer.vocab_size == 11
    three = f"--models={tmp_path / 'a'},{tmp_path / 'b'},{tmp_path / 'base'}"
    bad = run_script("tools/merge.py", "--method=slerp", three, f"--out_dir={tmp_path / 'x'}", check=False)
    assert bad.returncode == 2 and bad.stderr.strip() == "config error: slerp merges exactly two models, got 3"


def test_hugging_face_folders_merge_like_checkpoints(tmp_path, seed):
    pytest.importorskip("safetensors")
    from tools import export_hf
    a, b = (tiny_checkpoint(tmp_path / name, mlp="swiglu") for name in ("a", "b"))
    export_hf.export(a, str(tmp_path / "a-hf"))
    merged = merge.merged_checkpoint("slerp", [f"hf:{tmp_path / 'a-hf'}", str(tmp_path / "b")], t=0.25)
    expected = merge.merged_checkpoint("slerp", [str(tmp_path / "a"), str(tmp_path / "b")], t=0.25)
    assert all(torch.equal(merged["model"][k], v) for k, v in expected["model"].items())
