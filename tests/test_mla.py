"""Multi-head latent attention (model.MLA) against a naive float64 implementation written here: the prefill (expanded
form) and every decode step (absorbed form) with and without sliding windows, absorbed == expanded, a cache that holds
only the latent and the rope key, the settings MLA refuses, parameter/FLOP counting and optimizer groups, the
Hugging Face DeepSeek-V3 round trip with exact logits, and an exact resume through train.py."""
import json
import math
import os
import pytest
import torch
import torch.nn.functional as F

from model import GPT, MLA, GPTConfig, KVCache
from tests.conftest import TINY, assert_one_clear_line, run_script


def mla_config(**overrides):
    return GPTConfig(**dict(dict(block_size=32, vocab_size=37, n_layer=3, n_embd=32, n_head=4, qk_norm=False,
                                 kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=10,
                                 mlp="swiglu"), **overrides))


def random_model(cfg):
    """A model whose norm weights are away from 1 (a misplaced norm shows) and whose writers are not small."""
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif p.dim() == 2 and "wte" not in name:
                p.normal_(0, 1 / math.sqrt(p.size(1)))
    return model


# ------------------------------------------------------------------------------------ the naive float64 reference

def rms(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate(x, positions, theta):
    """RoPE on the last dim of x (..., T, d): pair (i, i + d/2) turned by position * theta^(-2i/d)."""
    d = x.size(-1)
    angle = positions[:, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return torch.cat((x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()), dim=-1)


def naive_attention(p, h, cfg, window):
    """MLA written out: per-head queries, per-head keys and values expanded from the normed latent, one rope key."""
    B, T, _ = h.shape
    H, nope, rope, r = cfg.n_head, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    if cfg.q_lora_rank:
        q = rms(h @ p["q_a_proj.weight"].T, p["q_a_layernorm.weight"], 1e-6) @ p["q_b_proj.weight"].T
    else:
        q = h @ p["q_proj.weight"].T
    q = q.view(B, T, H, nope + rope)
    compressed = h @ p["kv_a_proj_with_mqa.weight"].T
    latent = rms(compressed[..., :r], p["kv_a_layernorm.weight"], 1e-6)
    positions = torch.arange(T, dtype=torch.float64)
    k_rope = rotate(compressed[..., r:], positions, cfg.rope_theta)                       # (B, T, rope)
    kv = (latent @ p["kv_b_proj.weight"].T).view(B, T, H, nope + cfg.v_head_dim)
    k = torch.cat((kv[..., :nope], k_rope[:, :, None].expand(B, T, H, rope)), dim=-1)
    q = torch.cat((q[..., :nope], rotate(q[..., nope:].transpose(1, 2), positions, cfg.rope_theta).transpose(1, 2)),
                  dim=-1)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(nope + rope)
    i, j = positions[:, None], positions[None, :]
    visible = (j <= i) & ((i - j < window) if window else True)
    weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    y = torch.einsum("bhij,bjhv->bihv", weights, kv[..., nope:]).reshape(B, T, -1)
    return y @ p["o_proj.weight"].T


def naive_logits(model, idx):
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    x = sd["wte.weight"][idx]
    for layer in range(cfg.n_layer):
        p = {k.split(".", 2)[2]: v for k, v in sd.items() if k.startswith(f"blocks.{layer}.")}
        kind = cfg.attn_pattern[layer % len(cfg.attn_pattern)]
        h = rms(x, p["attn_norm.weight"], cfg.norm_eps)
        x = x + naive_attention({k[5:]: v for k, v in p.items() if k.startswith("attn.")}, h,
                                cfg, cfg.local_window if kind == "L" else None)
        h = rms(x, p["mlp_norm.weight"], cfg.norm_eps)
        x = x + (F.silu(h @ p["mlp.gate_proj.weight"].T) * (h @ p["mlp.up_proj.weight"].T)) @ p["mlp.down_proj.weight"].T
    return rms(x, sd["norm.weight"], cfg.norm_eps) @ sd["lm_head.weight"].T


# -------------------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("overrides", [dict(), dict(q_lora_rank=10, attn_pattern="LLG", local_window=5),
                                       dict(attn_pattern="L", local_window=64)])  # a window beyond the sequence
def test_prefill_and_decode_match_a_float64_reference(seed, overrides):
    cfg = mla_config(**overrides)
    model = random_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (3, 21))
    expected = naive_logits(model, tokens)
    prefill = int(torch.randint(1, 12, ()))
    cache = KVCache(cfg)
    with torch.no_grad():
        got = [model.logits(model(tokens[:, :prefill], cache=cache))]                   # expanded
        got += [model.logits(model(tokens[:, t:t + 1], cache=cache)) for t in range(prefill, tokens.size(1))]
        full = model.logits(model(tokens))                                                # no cache: expanded
    scale = expected.abs().max().item()
    assert (torch.cat(got, dim=1).double() - expected).abs().max().item() <= 1e-5 * scale
    assert (full.double() - expected).abs().max().item() <= 1e-5 * scale


@pytest.mark.parametrize("keys", [1, 9])
def test_absorbed_decode_equals_the_expanded_form(seed, keys):
    cfg = mla_config(q_lora_rank=8)
    attn = random_model(cfg).double().blocks[0].attn
    B, H = 2, cfg.n_head
    q_nope = torch.randn(B, H, 1, cfg.qk_nope_head_dim, dtype=torch.float64)
    q_rope = torch.randn(B, H, 1, cfg.qk_rope_head_dim, dtype=torch.float64)
    latent = torch.randn(B, 1, keys, cfg.kv_lora_rank, dtype=torch.float64)
    k_rope = torch.randn(B, 1, keys, cfg.qk_rope_head_dim, dtype=torch.float64)
    with torch.no_grad():
        absorbed = attn.absorbed(q_nope, q_rope, latent, k_rope)
        expanded = attn.expanded(q_nope, q_rope, latent, k_rope, None)
    assert absorbed.shape == expanded.shape == (B, H, 1, cfg.v_head_dim)
    assert (absorbed - expanded).abs().max().item() <= 1e-12 * expanded.abs().max().item()


def test_cache_holds_only_the_latent_and_the_rope_key(seed):
    cfg = mla_config(attn_pattern="LG", local_window=5, n_layer=4)
    model, batch = random_model(cfg), 2
    cache = KVCache(cfg)
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (batch, 7)), cache=cache)
        model(torch.randint(0, cfg.vocab_size, (batch, 1)), cache=cache)
    for group, latent in cache.k.items():
        slots = 5 if group % 2 == 0 else cfg.block_size
        assert latent.shape == (batch, 1, slots, cfg.kv_lora_rank)
        assert cache.v[group].shape == (batch, 1, slots, cfg.qk_rope_head_dim)
    held = sum(t.numel() * t.element_size() for t in (*cache.k.values(), *cache.v.values()))
    assert held == batch * KVCache.bytes_at(cfg, cfg.block_size, dtype_bytes=4)
    # bf16 at 1,000 tokens: two layers of 5-slot rings, two global layers of 1,000 positions, 12 + 4 numbers each
    assert KVCache.bytes_at(cfg, 1000) == 2 * (12 + 4) * (2 * 5 + 2 * 1000)


@pytest.mark.parametrize("overrides, named", [
    (dict(qk_norm=True), "qk_norm=False"),
    (dict(kv_share=2), "kv_share=2"),
    (dict(share_global_kv=True), "share_global_kv=True"),
    (dict(value_embeds=1), "value_embeds=1"),
    (dict(n_kv_head=2), "n_kv_head=2"),
    (dict(kv_lora_rank=0, q_lora_rank=8), "set kv_lora_rank > 0"),
    (dict(qk_rope_head_dim=5), "must be even"),
])
def test_settings_mla_cannot_combine_with_are_refused(overrides, named):
    with pytest.raises(ValueError, match="GPTConfig") as error:
        mla_config(**overrides)
    assert named in str(error.value) and "\n" not in str(error.value)


def test_the_triton_kernel_is_refused_for_unequal_widths():
    with pytest.raises(ValueError, match="attn_impl='sdpa'"):
        GPT(mla_config(), attn_impl="triton")  # q/k 10 wide, v 10 wide but not a kernel width
    GPT(mla_config(qk_nope_head_dim=12, qk_rope_head_dim=4, v_head_dim=16), attn_impl="triton")  # built


def test_train_refuses_mla_with_qk_norm_in_one_line(tmp_path):
    result = run_script("train.py", *TINY, "--kv_lora_rank=16", f"--out_dir={tmp_path}", check=False)
    assert_one_clear_line(result, "qk_norm=False")


def test_parameters_flops_and_optimizer_groups():
    from nanogpt.optim import group_of
    cfg = mla_config(q_lora_rank=10, n_layer=2, attn_pattern="LG", local_window=4)
    model = GPT(cfg)
    d, H, r, nope, rope, v = 32, 4, 12, 6, 4, 10
    attention = d * 10 + 10 + 10 * H * (nope + rope) + d * (r + rope) + r + r * H * (nope + v) + H * v * d
    mlp = 3 * d * cfg.hidden
    assert model.num_params() == 2 * (attention + mlp + 2 * d) + d + cfg.vocab_size * d
    # attention FLOPs: QK^T over nope + rope, AV over v; the local layer's 32 queries see (1+2+3+4*29)/32 keys
    seq = 32
    visible = {"L": (1 + 2 + 3 + 4 * 29) / seq, "G": (seq + 1) / 2}
    attn = sum(6 * H * (nope + rope + v) * visible[k] for k in "LG")
    assert model.flops_per_token(seq) == pytest.approx(6 * model.num_params(active=True) + attn)
    groups = {name: group_of(name, p) for name, p in model.named_parameters() if ".attn." in name}
    assert {n.split(".")[-2] for n, g in groups.items() if g == "matrices"} == {
        "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
    assert {n.split(".")[-2] for n, g in groups.items() if g == "vectors"} == {"q_a_layernorm", "kv_a_layernorm"}


def test_dry_run_reports_the_kv_layouts_at_the_7b_width(tmp_path):
    result = run_script("train.py", "config/train_7b.py", "config/train_7b_mla.py", "--dry_run=True",
                        f"--data_root={tmp_path}")
    per_token = {line.split("  ")[1].strip(): int(line.split()[-4].replace(",", ""))
                 for line in result.stdout.splitlines() if "bytes/token" in line}
    assert per_token["MHA"] == 32 * 2 * 4096 * 2 and per_token["GQA-8"] == per_token["MHA"] // 4
    assert per_token["MQA"] == 32 * 2 * 128 * 2 and per_token["MQA + CLA2"] == per_token["MQA"] // 2
    assert per_token["MLA (latent 512 + rope 64)"] == 32 * (512 + 64) * 2
    # this model: 27 local layers (1024-token rings) and 5 global ones, at 8,192 tokens of context
    assert per_token["this model"] == round((27 * 1024 + 5 * 8192) * 576 * 2 / 8192)


# ------------------------------------------------------------------------------------------- Hugging Face layout

@pytest.fixture
def hf_helpers():
    return pytest.importorskip("tests.test_hf")  # skips without transformers / safetensors


@pytest.mark.parametrize("overrides", [dict(), dict(q_lora_rank=10, n_expert=4, n_dense_layers=1, n_shared_expert=0)])
def test_export_to_deepseek_v3_and_back_is_exact(tmp_path, seed, hf_helpers, overrides):
    from tools import export_hf
    ours, ckpt = hf_helpers.our_checkpoint(mla_config(vocab_size=61, block_size=64, **overrides))
    assert export_hf.export(ckpt, str(tmp_path / "hf")) == "deepseek_v3"
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_interleave"] and config["architectures"] == ["DeepseekV3ForCausalLM"]
    theirs = hf_helpers.transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", **hf_helpers.EAGER).eval()
    assert hf_helpers.max_logit_difference(ours, theirs, 61) <= 1e-5
    back = hf_helpers.hf.read_hf_checkpoint(str(tmp_path / "hf"))
    assert back["model"].keys() == ckpt["model"].keys()
    assert all(torch.equal(back["model"][k], v) for k, v in ckpt["model"].items())
    assert hf_helpers.resolved(back["model_args"]) == hf_helpers.resolved(ckpt["model_args"])


@pytest.mark.parametrize("interleave", [True, False])
def test_import_computes_the_transformers_deepseek_v3(tmp_path, seed, hf_helpers, interleave):
    transformers = hf_helpers.transformers
    config = transformers.DeepseekV3Config(
        **dict(hf_helpers.SMALL, num_key_value_heads=4), **hf_helpers.MOE, first_k_dense_replace=1, n_group=1,
        topk_group=1, kv_lora_rank=12, q_lora_rank=None if interleave else 10, qk_nope_head_dim=8, qk_rope_head_dim=6,
        v_head_dim=8, rope_interleave=interleave)
    theirs = transformers.AutoModelForCausalLM.from_config(config, **hf_helpers.EAGER).eval()
    hf_helpers.randomize(theirs)
    theirs.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(hf_helpers.hf.char_tokenizer_json(hf_helpers.CHARS))
    ckpt = hf_helpers.hf.read_hf_checkpoint(str(tmp_path))
    ours = GPT(GPTConfig(**ckpt["model_args"])).eval()
    ours.load_state_dict(ckpt["model"])
    assert ours.config.mla and ours.config.n_expert == 4
    assert hf_helpers.max_logit_difference(ours, theirs, 61) <= 1e-5


def test_export_refuses_mla_with_sliding_windows(tmp_path, hf_helpers):
    from tools import export_hf
    _, ckpt = hf_helpers.our_checkpoint(mla_config(vocab_size=61, attn_pattern="LG", local_window=4))
    with pytest.raises(ValueError, match="DeepSeek-V3 .* has no sliding windows"):
        export_hf.export(ckpt, str(tmp_path / "hf"))
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------------------------------------------- resume

def test_resume_reproduces_uninterrupted_losses(tmp_path, data_root):
    from tests.test_train import train_losses
    common = TINY + ["--kv_lora_rank=16", "--q_lora_rank=16", "--qk_norm=False", "--attn_pattern=LG",
                     "--local_window=8", "--optimizer=muon", f"--data_root={data_root}", "--eval_interval=4"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run_script("train.py", *common, "--max_iters=8", f"--out_dir={straight}")
    run_script("train.py", *common, "--max_iters=4", f"--out_dir={split}")
    run_script("train.py", *common, "--max_iters=8", f"--out_dir={split}", "--init_from=resume")
    a, b = train_losses(straight), train_losses(split)
    assert sorted(a) == list(range(1, 9)) and a == b  # bit-identical losses after the resume at iter 4
    saved = torch.load(os.path.join(split, "ckpt.pt"), weights_only=True)["model_args"]
    assert isinstance(GPT(GPTConfig(**saved)).blocks[0].attn, MLA)
