"""nanogpt/interp.py and interp.py: hook points against the plain forward, patching with the clean run's own
activations (exact) and with zeros, the logit lens's last row against the model's logits, attention patterns against
a float64 recomputation written here, direct logit attribution against the head's own arithmetic, and bad input as
one clear line. Models: GQA with value embeddings and a softcap; sliding windows with shared K/V (CLA2 and shared
global K/V) on one K/V head; MoE."""
import glob
import math
import os

import pytest
import torch
from conftest import assert_one_clear_line, run_script
from test_chat import save

from model import GPT, GPTConfig
from nanogpt import interp
from nanogpt.files import read_json

CHARS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SPEC = {"kind": "char", "chars": CHARS}
CONFIGS = {
    "gqa_ve_softcap": dict(n_head=4, n_kv_head=2, value_embeds=1, logit_softcap=15.0),
    "windows_shared_kv": dict(n_layer=5, n_kv_head=1, attn_pattern="LLG", local_window=5, kv_share=2,
                              share_global_kv=True, qk_norm=False),
    "moe": dict(n_expert=4, n_expert_active=2, n_dense_layers=1, mlp="swiglu"),
}


def tiny_model(**overrides):
    args = dict(block_size=32, vocab_size=len(CHARS), n_layer=3, n_embd=32, n_head=2, mlp="relu2")
    model = GPT(GPTConfig(**{**args, **overrides})).eval()
    with torch.no_grad():  # larger writers and a wider head than the init: patterns and logits far from uniform
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "w_down")):
                p.mul_(5)
        model.lm_head.weight.mul_(10)
    return model


def tokens(model, batch=2, length=13):
    return torch.randint(0, model.config.vocab_size, (batch, length))


@pytest.fixture(params=list(CONFIGS))
def model(request, seed):
    return tiny_model(**CONFIGS[request.param])


def test_hooked_forward_equals_the_plain_one_and_hooks_are_removed(model):
    idx = tokens(model)
    with torch.no_grad():
        plain = model.logits(model(idx))
    names = [n for n in interp.hook_names(model) if not n.endswith("pattern")]
    logits, cache = interp.run_with_cache(model, idx, names)
    assert torch.equal(logits, plain)  # every point but the pattern: the model's own kernels, bit for bit
    assert set(cache) == set(names)
    logits, _ = interp.run_with_cache(model, idx, [n for n in interp.hook_names(model) if n.endswith("pattern")])
    torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-5)  # explicit softmax(qk) v on every layer
    assert all(m.hook is None for m in model.modules() if hasattr(m, "hook"))


def test_patching_every_point_with_the_clean_activations_gives_the_clean_logits_exactly(model):
    idx = tokens(model)
    names = interp.hook_names(model)
    clean, cache = interp.run_with_cache(model, idx, names)
    patched, _ = interp.run_with_cache(model, idx, names, patches=dict(cache))
    assert torch.equal(patched, clean)
    layer = torch.randint(0, model.config.n_layer, ()).item()
    for name in [n for n in names if n.startswith(f"blocks.{layer}.")]:  # a zero patch at any point changes them
        zeroed, _ = interp.run_with_cache(model, idx, patches={name: torch.zeros_like(cache[name])})
        assert not torch.allclose(zeroed, clean), name


def test_the_logit_lens_at_the_last_layer_is_the_models_logits(model):
    idx = tokens(model)
    lens = interp.logit_lens(model, idx)
    assert lens.shape[0] == model.config.n_layer + 1
    assert torch.equal(lens[-1], interp.run_with_cache(model, idx)[0])


def pattern_float64(q, k, window):
    """The reference: one softmax per (sequence, head, query) over the keys the rule lets it see, in float64."""
    B, H, T, D = q.shape
    out = torch.zeros(B, H, T, T, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kv_head = h * k.size(1) // H
            for i in range(T):
                keys = [j for j in range(T) if j <= i and (window is None or j > i - window)]
                s = torch.tensor([q[b, h, i].double() @ k[b, kv_head, j].double() / math.sqrt(D) for j in keys])
                out[b, h, i, keys] = s.softmax(0)
    return out


@pytest.mark.parametrize("length", [13, 4])  # windows of 5 shorter and longer than the sequence
def test_patterns_sum_to_one_stay_in_the_window_and_match_float64(model, length):
    idx = tokens(model, length=length)
    L = model.config.n_layer
    names = [f"blocks.{i}.attn.{p}" for i in range(L) for p in ("pattern", "q")]
    names += [f"blocks.{i}.attn.k" for i in range(L) if model.blocks[i].attn.produces_kv]
    _, cache = interp.run_with_cache(model, idx, names)
    for i, block in enumerate(model.blocks):
        pattern, window = cache[f"blocks.{i}.attn.pattern"], block.attn.window
        k = cache[f"blocks.{interp.kv_producer(model, i)}.attn.k"]  # a consumer attends to its producer's keys
        torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))
        ii, jj = torch.meshgrid(torch.arange(length), torch.arange(length), indexing="ij")
        outside = (jj > ii) | ((jj <= ii - window) if window else torch.zeros_like(ii, dtype=torch.bool))
        assert (pattern[..., outside] == 0).all()
        reference = pattern_float64(cache[f"blocks.{i}.attn.q"], k, window)
        torch.testing.assert_close(pattern.double(), reference, rtol=1e-5, atol=1e-6)


def test_direct_logit_attribution_sums_to_the_pre_softcap_logit(model):
    idx = tokens(model, batch=1)
    target, foil = 3, 7
    dla = interp.direct_logit_attribution(model, idx, target, foil)
    L, cfg = model.config.n_layer, model.config
    names = [f"blocks.{i}.attn_out" for i in range(L)] + [f"blocks.{L - 1}.resid_post"]
    logits, cache = interp.run_with_cache(model, idx, names)
    # by hand: the head before the softcap, from the final hidden state
    with torch.no_grad():
        h = model(idx)[0, -1].double()
    w = model.lm_head.weight.double()
    raw = (h @ w[target] - h @ w[foil]).item()
    assert dla["total"] == pytest.approx(raw, rel=1e-5, abs=1e-5)
    assert dla["logit"] == pytest.approx(raw, rel=1e-5, abs=1e-5)
    if cfg.logit_softcap:  # the capped logits are c tanh(raw / c) of each logit
        c, lg = cfg.logit_softcap, logits[0, -1]
        capped = c * math.tanh((h @ w[target]).item() / c) - c * math.tanh((h @ w[foil]).item() / c)
        assert (lg[target] - lg[foil]).item() == pytest.approx(capped, rel=1e-5, abs=1e-5)
    # each layer's heads add up to what its o_proj wrote, read through the frozen final norm
    x = cache[f"blocks.{L - 1}.resid_post"][0, -1].double()
    read = model.norm.weight.double() * (w[target] - w[foil]) / torch.sqrt(x.square().mean() + cfg.norm_eps)
    for i in range(L):
        by_layer = cache[f"blocks.{i}.attn_out"][0, -1].double() @ read
        assert dla["heads"][i].sum().item() == pytest.approx(by_layer.item(), rel=1e-5, abs=1e-5)


def test_patching_recovers_all_where_the_prompts_differ_and_nothing_before(seed):
    model = tiny_model(**CONFIGS["windows_shared_kv"])  # (value embeddings would carry the token past resid_pre)
    clean = tokens(model, batch=1, length=6)
    corrupt = clean.clone()
    corrupt[0, 2] = (clean[0, 2] + 1) % model.config.vocab_size  # one token differs
    results, _, _ = interp.activation_patching(model, clean, corrupt, 3, 7)
    assert results["resid_pre"].shape == (5, 6) and results["attn.z"].shape == (5, 2)
    # layer 0's input at the differing position is the whole difference: patched, the run is the clean one
    assert results["resid_pre"][0, 2].item() == pytest.approx(1.0, abs=1e-4)
    assert results["resid_pre"][0, 3:].abs().max() < 1e-5  # the same token, the same embedding (float32 rounding)
    # (causal) before the differing token both runs agree at every layer: patching there changes nothing
    assert results["resid_pre"][:, :2].abs().max() < 1e-5 and results["attn_out"][:, :2].abs().max() < 1e-5


def test_induction_and_previous_token_scores_read_the_pattern(seed):
    model = tiny_model()
    idx = interp.repeated_random_tokens(3, 6, model.config.vocab_size, torch.Generator().manual_seed(seed))
    assert torch.equal(idx[:, :6], idx[:, 6:])
    induction, previous, _ = interp.induction_scores(model, idx)
    _, cache = interp.run_with_cache(model, idx, ["blocks.1.attn.pattern"])
    p = cache["blocks.1.attn.pattern"]
    assert induction[1, 0].item() == pytest.approx(sum(p[b, 0, i, i - 5].item() for b in range(3)
                                                       for i in range(6, 12)) / 18, rel=1e-5)
    assert previous[1, 1].item() == pytest.approx(sum(p[b, 1, i, i - 1].item() for b in range(3)
                                                      for i in range(1, 12)) / 33, rel=1e-5)


def test_routing_stats_count_every_routed_slot(seed):
    model = tiny_model(**CONFIGS["moe"])
    stream = torch.randint(0, model.config.vocab_size, (70,))
    stats = interp.routing_stats(model, stream, seq_len=16, batch_size=3)
    assert set(stats) == {1, 2}
    for s in stats.values():
        assert s["counts"].sum() == 64 * 2 and s["load"].sum().item() == pytest.approx(1.0)
        assert 0 < s["entropy"] <= math.log(4) + 1e-6


def test_an_unknown_hook_name_lists_the_near_ones(seed):
    model = tiny_model(**CONFIGS["windows_shared_kv"])
    with pytest.raises(ValueError, match=r"'blocks.1.attn.patern'; near ones: blocks.1.attn.pattern"):
        interp.run_with_cache(model, tokens(model), ["blocks.1.attn.patern"])
    with pytest.raises(ValueError, match=r"layer 1 has no K/V of its own, it attends to layer 0's"):
        interp.run_with_cache(model, tokens(model), ["blocks.1.attn.k"])
    with pytest.raises(ValueError, match="patch for blocks.0.resid_pre has shape"):
        interp.run_with_cache(model, tokens(model), patches={"blocks.0.resid_pre": torch.zeros(3)})


# ------------------------------------------------------------------------------------------------ the command

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save(tmp_path_factory.mktemp("interp"), "run", tiny_model(**CONFIGS["gqa_ve_softcap"], block_size=64),
                SPEC)


def interp_cmd(run_dir, *args):
    return run_script("interp.py", f"--out_dir={run_dir}", "--device=cpu", *args, check=False)


def test_bad_input_is_one_clear_line(run_dir):
    assert_one_clear_line(interp_cmd(run_dir, "--view=logit_lens", "--target=ab"),
                          "--target='ab' is 2 tokens", "one token")
    assert_one_clear_line(interp_cmd(run_dir, "--view=patching", "--prompt=Hello", "--corrupt=Hi"),
                          "equal length in tokens", "5", "2")
    assert_one_clear_line(interp_cmd(run_dir, "--view=attention", "--prompt=€"), "--prompt")
    assert_one_clear_line(interp_cmd(run_dir, "--view=moe"), "no MoE layers")


def test_every_view_writes_its_json_and_pictures(run_dir):
    result = interp_cmd(run_dir, "--view=all", "--prompt=To be, or not", "--corrupt=To go, or not",
                        "--n_repeat_tokens=8", "--n_repeat_seqs=2")
    assert result.returncode == 0, result.stderr[-2000:]
    for view in ("attention", "logit_lens", "patching", "dla", "induction"):
        data = read_json(os.path.join(run_dir, "interp", f"{view}.json"))
        assert data["view"] == view
        assert glob.glob(os.path.join(run_dir, "interp", f"{view}*.png")), view


def test_the_moe_view_routes_a_val_shard(tmp_path, seed):
    from nanogpt.shards import write_shard
    run = save(tmp_path, "moe", tiny_model(**CONFIGS["moe"]), SPEC)
    (tmp_path / "data" / "tiny").mkdir(parents=True)
    write_shard(str(tmp_path / "data" / "tiny" / "val_000000.bin"), torch.randint(0, len(CHARS), (200,)).numpy())
    result = interp_cmd(run, "--view=moe", f"--data_root={tmp_path / 'data'}", "--dataset=tiny", "--moe_tokens=100")
    assert result.returncode == 0, result.stderr[-2000:]
    data = read_json(str(tmp_path / "moe" / "interp" / "moe.json"))
    assert data["tokens"] == 100 and [row["layer"] for row in data["layers"]] == [1, 2]
    assert sum(data["layers"][0]["load"]) == pytest.approx(1.0)
    assert (tmp_path / "moe" / "interp" / "moe.png").exists()
