"""Product-key memory (model.py ProductKeyMemory) against a brute-force search over every memory slot; its
optimizer group (never Muon), parameter counts and refusals."""
import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, ProductKeyMemory
from nanogpt.optim import build_optimizer, group_of
from tests.conftest import TINY, assert_one_clear_line, run_script


def tiny(**kw):
    args = dict(block_size=16, vocab_size=13, n_layer=2, n_embd=16, n_head=2, memory_layers=(1,), memory_keys=6,
                memory_topk=3, memory_heads=2, memory_key_dim=8)
    return GPTConfig(**{**args, **kw})


def brute_force(memory, x):
    """Every one of the memory_keys^2 slots scored (sum of its two halves' scores), the top k per head softmaxed,
    their values summed over heads; then Memory+'s gate and projection."""
    cfg = memory.cfg
    H, n, k, dk = cfg.memory_heads, cfg.memory_keys, cfg.memory_topk, cfg.memory_key_dim
    q = F.rms_norm(memory.query(x).view(-1, H, 2, dk // 2), (dk // 2,))
    keys = F.rms_norm(memory.sub_keys, (dk // 2,))
    out = torch.zeros(x.size(0), cfg.n_embd, dtype=x.dtype)
    for t in range(x.size(0)):
        for h in range(H):
            full = torch.tensor([[q[t, h, 0] @ keys[h, 0, i] + q[t, h, 1] @ keys[h, 1, j] for j in range(n)]
                                 for i in range(n)]).flatten()   # slot i * n + j
            top, slot = full.topk(k)
            out[t] += (top.softmax(0)[:, None] * memory.values.weight[slot]).sum(0)
    if memory.gate is not None:
        out = memory.out_proj(out * F.silu(memory.gate(x)))
    return out


@pytest.mark.parametrize("gated", [True, False])
def test_lookup_equals_a_brute_force_search_over_every_slot(seed, gated):
    memory = ProductKeyMemory(tiny(memory_gated=gated)).double()
    for p in memory.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    out, balance = memory(x)
    assert balance is None
    with torch.no_grad():
        torch.testing.assert_close(out.view(10, 16), brute_force(memory, x.view(10, 16)))


def test_gradient_reaches_only_the_slots_read(seed):
    memory = ProductKeyMemory(tiny(memory_keys=8, memory_topk=2, memory_heads=1)).double()
    x = torch.randn(1, 3, 16, dtype=torch.float64)
    memory(x)[0].square().sum().backward()
    slots, _ = memory.lookup(x.view(3, 16))
    touched = memory.values.weight.grad.abs().sum(1).nonzero().flatten()
    assert set(touched.tolist()) == set(slots.flatten().tolist())


def test_value_tables_are_adamw_never_muon_and_keys_are_not_matrices():
    model = GPT(tiny())
    names = {p: name for name, p in model.named_parameters()}
    memory = model.blocks[1].mlp
    assert group_of(names[memory.values.weight], memory.values.weight) == "memory"
    assert group_of(names[memory.sub_keys], memory.sub_keys) == "vectors"
    opt = build_optimizer("muon", model, 1e-3, 0.1, (0.9, 0.95), {}, "cpu")
    group = next(g for g in opt.param_groups if any(p is memory.values.weight for p in g["params"]))
    assert group["kind"] == "adamw" and group["weight_decay"] == 0.0
    muon_params = [p for g in opt.param_groups if g["kind"] == "muon" for p in g["params"]]
    assert all(p is not memory.values.weight and p is not memory.sub_keys for p in muon_params)
    assert any(p is memory.query.weight for p in muon_params)  # the query projection is a plain matrix


def test_active_parameters_count_only_the_value_rows_read():
    model = GPT(tiny())
    cfg = model.config
    table = cfg.memory_keys ** 2 * cfg.n_embd
    read = cfg.memory_heads * cfg.memory_topk * cfg.n_embd
    assert model.num_params() - model.num_params(active=True) == table - read


def test_memory_model_trains_and_samples(tmp_path, data_root):
    out = str(tmp_path / "out")
    run_script("train.py", *TINY, f"--data_root={data_root}", "--memory_layers=1,", "--memory_keys=8",
               "--memory_topk=4", "--max_iters=4", "--eval_interval=4", f"--out_dir={out}", "--optimizer=muon")
    result = run_script("sample.py", f"--out_dir={out}", "--max_new_tokens=8", "--num_samples=1", "--device=cpu")
    assert "tokens/s" in result.stdout


@pytest.mark.parametrize("flags, needle", [(["--memory_layers=7,"], "memory_layers"),
                                           (["--memory_layers=1,", "--memory_topk=200"], "memory_topk")])
def test_bad_memory_settings_get_one_line(tmp_path, flags, needle):
    result = run_script("train.py", *TINY, *flags, f"--out_dir={tmp_path / 'o'}", check=False)
    assert_one_clear_line(result, needle)
