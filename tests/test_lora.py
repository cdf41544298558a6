"""LoRA (nanogpt/lora.py): zero-initialised adapters reproduce the base exactly, merged == unmerged in float64,
gradients and optimizer state on the adapters only, fp8 bases, and through train.py: adapter-only checkpoints with a
base pointer, exact resume, 2-process DDP = one process, merged loading and tools/merge.py, bad targets."""
import os
from dataclasses import asdict

import pytest
import torch

from model import GPT, GPTConfig
from nanogpt import checkpoint, lora
from nanogpt.checkpoint import (
    load_model,
    model_from_checkpoint,
    read_checkpoint,
    read_checkpoint_file,
    save_checkpoint,
)
from nanogpt.optim import build_optimizer, state_bytes
from tests.conftest import TINY, assert_one_clear_line, run_script
from tests.test_distributed import launch, losses

# an MoE model with a dense first layer and SwiGLU experts: every kind of adapted weight
MOE = dict(vocab_size=65, n_layer=2, n_embd=32, n_head=2, n_kv_head=1, block_size=32, n_expert=4, moe_hidden=16)


def base_and_input(seed, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**dict(MOE, **overrides))).to(dtype).eval()
    return model, torch.randint(0, 65, (3, 17))


def randomize(model):
    """Adapters with non-zero B (as after training), so merging has something to fold in."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.1)


def head_logits(model, x):
    return model.logits(model(x))


@pytest.mark.parametrize("mlp", ["swiglu", "relu2"])
def test_zero_b_reproduces_the_base_exactly(seed, mlp):
    model, x = base_and_input(seed, mlp=mlp)
    before = head_logits(model, x)
    names = lora.attach(model, rank=4, alpha=8.0, dropout=0.1, targets="*_proj", experts=True, seed=seed)
    assert {n.rsplit(".", 1)[-1] for n in names} >= {"q_proj", "o_proj", "down_proj", "w_up", "w_down"}
    assert torch.equal(head_logits(model, x), before)


def test_merged_equals_unmerged_in_float64(seed):
    model, x = base_and_input(seed, torch.float64)
    lora.attach(model, rank=3, alpha=5.0, dropout=0.2, targets="q_proj,v_proj,up_proj,gate_proj,down_proj",
                experts=True, seed=seed)
    model.double()
    randomize(model)
    model.train()
    model.blocks[0].attn.q_proj.dropout.train()
    assert not torch.allclose(model.blocks[0].attn.q_proj(torch.ones(2, 32, dtype=torch.float64)),
                              model.eval().blocks[0].attn.q_proj(torch.ones(2, 32, dtype=torch.float64)))
    model.eval()  # dropout off: the adapted function is the merged one
    unmerged = head_logits(model, x)
    merged_model = lora.merge(model)
    assert not any(isinstance(m, lora.LoRALinear) for m in merged_model.modules())
    assert set(merged_model.state_dict()) == set(GPT(GPTConfig(**MOE)).state_dict())  # the base's names again
    torch.testing.assert_close(head_logits(merged_model, x), unmerged, rtol=1e-12, atol=1e-12)
    fresh, _ = base_and_input(seed, torch.float64)
    assert not torch.allclose(head_logits(fresh, x), unmerged)  # the adapters changed the function


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_gradients_and_optimizer_state_on_adapters_only(seed, optimizer):
    model, x = base_and_input(seed)
    lora.attach(model, rank=2, alpha=4.0, dropout=0.0, targets="*_proj", experts=True, seed=seed)
    model.train()
    ce, balance = model(x, torch.randint(0, 65, x.shape))
    (ce + balance).backward()
    for name, p in model.named_parameters():
        if lora.is_adapter(name):
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None and not p.requires_grad, name
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))
    opt = build_optimizer(optimizer, model, 1e-2, 0.1, (0.9, 0.95), {}, "cpu")
    assert [g["name"] for g in opt.param_groups] == ["lora"]
    adapters = sum(p.numel() for n, p in model.named_parameters() if lora.is_adapter(n))
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == adapters
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert lora.optimizer_state_bytes(opt) >= state_bytes(optimizer, model) == 8 * adapters  # AdamW: 2 fp32 moments


@pytest.mark.parametrize("experts", [False, True])
def test_fp8_base_with_adapters(seed, experts):
    model, x = base_and_input(seed, n_embd=64, n_head=4, moe_hidden=32)
    assert model.convert_fp8("tensorwise") == []
    before = head_logits(model, x)
    lora.attach(model, rank=4, alpha=8.0, dropout=0.0, targets="*_proj", experts=experts, seed=seed)
    assert type(model.blocks[0].attn.q_proj.base).__name__ == "Float8Linear"  # the base matmul stays fp8
    assert torch.equal(head_logits(model, x), before)
    model.train()
    ce, _ = model(x, torch.randint(0, 65, x.shape))
    ce.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert any(n.startswith("blocks.1.mlp.parametrizations") for n in grads) == experts


def test_targets_by_pattern_and_refusals(seed):
    model, _ = base_and_input(seed)
    assert lora.choose_targets(model, "blocks.1.*") == ["blocks.1.attn.q_proj", "blocks.1.attn.k_proj",
                                                        "blocks.1.attn.v_proj", "blocks.1.attn.o_proj",
                                                        "blocks.1.mlp.shared.up_proj", "blocks.1.mlp.shared.gate_proj",
                                                        "blocks.1.mlp.shared.down_proj"]
    assert all(n.endswith("v_proj") for n in lora.choose_targets(model, "v_proj"))
    with pytest.raises(ValueError, match="'qproj' matches no linear layer.*q_proj"):
        lora.choose_targets(model, "q_proj,qproj")
    with pytest.raises(ValueError, match="router"):  # never offered, so a router pattern matches nothing
        lora.choose_targets(model, "router")
    dense, _ = base_and_input(seed, n_expert=0)
    with pytest.raises(ValueError, match="no routed experts"):
        lora.attach(dense, 2, 4.0, 0.0, "*_proj", experts=True)

# ----------------------------------------------------------------------------------------------------- train.py


@pytest.fixture(scope="module")
def runs(data_root, tmp_path_factory):
    """A base checkpoint, and LoRA runs from it: 8 steps straight, 4 + a resume to 8."""
    tmp = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    cfg = GPTConfig(**MOE)
    base = str(tmp / "base.pt")
    save_checkpoint({"model": GPT(cfg).state_dict(), "model_args": asdict(cfg)}, base)
    common = [*TINY, f"--data_root={data_root}", f"--init_from={base}", "--lora_rank=4", "--lora_alpha=8",
              "--lora_experts=True", "--lora_targets=q_proj,v_proj,*down_proj", "--eval_interval=4",
              "--batch_size=8", "--learning_rate=1e-2", "--dtype=float32"]
    straight = run_script("train.py", *common, "--max_iters=8", f"--out_dir={tmp / 'straight'}")
    run_script("train.py", *common, "--max_iters=4", f"--out_dir={tmp / 'split'}")
    run_script("train.py", *common, "--max_iters=8", f"--out_dir={tmp / 'split'}", "--init_from=resume")
    return tmp, base, common, straight


def test_lora_run_checkpoint_resume_and_log(runs):
    tmp, base, _, straight = runs
    assert "trainable parameters of" in straight.stdout and "optimizer state planned" in straight.stdout
    assert "optimizer state" in straight.stdout.splitlines()[-2]  # measured at the end
    a, b = losses(tmp / "straight"), losses(tmp / "split")
    assert sorted(a) == list(range(1, 9)) and a == b  # bit-identical after the resume at step 4
    ckpts = [read_checkpoint_file(str(tmp / name / "ckpt.pt")) for name in ("straight", "split")]
    assert ckpts[0]["lora_base"] == os.path.abspath(base) and len(ckpts[0]["lora_base_fingerprint"]) == 64
    assert ckpts[0]["lora"] == dict(rank=4, alpha=8.0, targets="q_proj,v_proj,*down_proj", experts=True, dropout=0.0)
    for name, t in ckpts[0]["model"].items():  # adapters and the MoE routing biases, nothing else
        assert lora.is_adapter(name) or name.endswith("mlp.bias"), name
        assert torch.equal(t, ckpts[1]["model"][name])
    assert any(not torch.equal(t, torch.zeros_like(t)) for n, t in ckpts[0]["model"].items() if n.endswith("lora_B"))


def test_lora_checkpoint_loads_merged_and_merge_tool(runs):
    tmp, base, _, _ = runs
    ckpt = read_checkpoint_file(str(tmp / "straight" / "ckpt.pt"))
    unmerged = model_from_checkpoint(read_checkpoint(base), base)
    lora.attach(unmerged, 4, 8.0, 0.0, "q_proj,v_proj,*down_proj", experts=True)
    lora.load_adapter_state(unmerged, ckpt["model"])
    merged, tokenizer, _ = load_model(str(tmp / "straight"))
    assert tokenizer.vocab_size == 65
    x = torch.randint(0, 65, (2, 32))
    torch.testing.assert_close(head_logits(merged, x), head_logits(unmerged.eval(), x), rtol=1e-5, atol=1e-5)
    run_script("tools/merge.py", "--method=lora", f"--models={tmp / 'straight'}", f"--out_dir={tmp / 'merged'}")
    written = read_checkpoint(str(tmp / "merged"))
    assert "lora" not in written and written["config"]["merge"]["base"] == os.path.abspath(base)
    assert all(torch.equal(v, merged.state_dict()[k]) for k, v in written["model"].items())
    refused = run_script("tools/merge.py", "--method=lora", f"--models={tmp / 'merged'}",
                         f"--out_dir={tmp / 'again'}", check=False)
    assert_one_clear_line(refused, "holds no LoRA adapters")
    changed = read_checkpoint(base)  # a base replaced since the adapters were trained is refused
    changed["model"]["norm.weight"] = changed["model"]["norm.weight"] + 1
    save_checkpoint(changed, str(tmp / "changed.pt"))
    with pytest.raises(ValueError, match="not the ones they were trained on"):
        checkpoint.merged_lora_checkpoint(dict(ckpt, lora_base=str(tmp / "changed.pt")), "adapters")


def test_lora_under_ddp_matches_one_process(runs):
    tmp, _, common, _ = runs
    launch(2, *common, "--batch_size=4", "--max_iters=8", f"--out_dir={tmp / 'ddp'}")
    one, two = losses(tmp / "straight"), losses(tmp / "ddp")
    assert one.keys() == two.keys() and all(abs(one[i] - two[i]) < 1e-5 * one[i] for i in one), (one, two)


def test_bad_lora_settings_one_line(runs, tmp_path):
    _, _, common, _ = runs
    result = run_script("train.py", *common, "--lora_targets=q_proj,qproj", "--max_iters=2",
                        f"--out_dir={tmp_path / 'bad'}", check=False)
    assert_one_clear_line(result, "lora_targets pattern 'qproj' matches no linear layer")
    assert not os.path.exists(tmp_path / "bad")
