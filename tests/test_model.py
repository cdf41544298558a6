"""model.py against naive references: hybrid masks, RoPE/GQA/shared-KV forward, MoE routing, cached generation."""
import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, KVCache, MoE, attention_mask, layer_plan
from nanogpt.optim import build_optimizer
from nanogpt.sampling import SamplingParams, next_tokens, sampler
from nanokernels.attention import flash_decode

pytestmark = pytest.mark.usefixtures("seed")  # every test: a fresh printed seed (tests/conftest.py)


def tiny(**kw):
    args = dict(block_size=32, vocab_size=37, n_layer=4, n_embd=32, n_head=4, dropout=0.0)
    args.update(kw)
    return GPTConfig(**args)


def randomize_norms(model):
    """Norm weights start at 1; perturb them so a reference that skips one cannot pass."""
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.data.add_(0.3 * torch.randn_like(p))
    return model


# ------------------------------------------------------------------------------------------ naive float64 reference

def naive_rms(x, w, eps=1e-6):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def naive_rope(x, theta):  # x: (B, T, H, D); rotate pairs (i, i + D/2) by pos * theta^(-2i/D)
    B, T, H, D = x.shape
    out = x.clone()
    for pos in range(T):
        for i in range(D // 2):
            a = pos * theta ** (-2 * i / D)
            x1, x2 = x[:, pos, :, i], x[:, pos, :, i + D // 2]
            out[:, pos, :, i] = x1 * math.cos(a) - x2 * math.sin(a)
            out[:, pos, :, i + D // 2] = x2 * math.cos(a) + x1 * math.sin(a)
    return out


def naive_attention(q, k, v, window):  # q (B,T,H,D), k/v (B,T,Hkv,D); loops over positions
    B, T, H, D = q.shape
    group = H // k.size(2)
    out = torch.zeros_like(q)
    for i in range(T):
        keys = [j for j in range(T) if j <= i and (window is None or j > i - window)]
        for h in range(H):
            s = torch.einsum("bd,bjd->bj", q[:, i, h], k[:, keys, h // group]) / math.sqrt(D)
            out[:, i, h] = torch.einsum("bj,bjd->bd", s.softmax(-1), v[:, keys, h // group])
    return out


def naive_mlp(mlp, x):
    if mlp.swiglu:
        return F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T) @ mlp.down_proj.weight.T
    return F.relu(x @ mlp.up_proj.weight.T).square() @ mlp.down_proj.weight.T


def naive_moe(moe, x):  # one token at a time
    cfg, out = moe.cfg, torch.zeros_like(x)
    flat, flat_out = x.reshape(-1, x.size(-1)), out.view(-1, x.size(-1))
    for t, tok in enumerate(flat):
        scores = torch.sigmoid(tok @ moe.router.weight.T)
        chosen = sorted(range(cfg.n_expert), key=lambda e: -(scores[e] + moe.bias[e]).item())[:cfg.n_expert_active]
        total = sum(scores[e] for e in chosen)
        for e in chosen:
            h = tok @ moe.w_up[e].T
            h = F.silu(h[:h.numel() // 2]) * h[h.numel() // 2:] if cfg.mlp == "swiglu" else F.relu(h).square()
            flat_out[t] += scores[e] / total * (h @ moe.w_down[e].T)
        if moe.shared is not None:
            flat_out[t] += naive_mlp(moe.shared, tok)
    return out


def naive_value_embed_layers(cfg):
    """{layer: table} by the rule: table j feeds the j-th K/V producer from the start and the j-th from the end."""
    producers = [i for i, (_, _, produces) in enumerate(layer_plan(cfg)) if produces]
    layers = {}
    for j in range(cfg.value_embeds):
        if j < len(producers):
            layers[producers[j]] = j
            layers[producers[len(producers) - 1 - j]] = j
    return layers


def naive_forward(model, idx):
    m = copy.deepcopy(model).double()
    cfg, hd = m.config, m.config.head_dim
    x = m.wte.weight[idx]
    produced, ve_layers = {}, naive_value_embed_layers(cfg)
    B, T = idx.shape
    for i, (block, (kind, group, produces)) in enumerate(zip(m.blocks, layer_plan(cfg))):
        a = block.attn
        h = naive_rms(x, block.attn_norm.weight)
        q = (h @ a.q_proj.weight.T).view(B, T, -1, hd)
        q = naive_rope(naive_rms(q, a.q_norm.weight) if cfg.qk_norm else q, cfg.rope_theta)
        if produces:
            k = (h @ a.k_proj.weight.T).view(B, T, -1, hd)
            k = naive_rope(naive_rms(k, a.k_norm.weight) if cfg.qk_norm else k, cfg.rope_theta)
            v = (h @ a.v_proj.weight.T).view(B, T, -1, hd)
            if i in ve_layers:
                v = a.ve_mix[0] * v + a.ve_mix[1] * m.value_embeds[ve_layers[i]].weight[idx].view(B, T, -1, hd)
            produced[group] = (k, v)
        k, v = produced[group]
        y = naive_attention(q, k, v, cfg.local_window if kind == "L" else None)
        x = x + y.reshape(B, T, -1) @ a.o_proj.weight.T
        h = naive_rms(x, block.mlp_norm.weight)
        x = x + (naive_moe(block.mlp, h) if isinstance(block.mlp, MoE) else naive_mlp(block.mlp, h))
    logits = naive_rms(x, m.norm.weight) @ m.lm_head.weight.T
    return cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap) if cfg.logit_softcap else logits


# -------------------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("window", [1, 5, 20, 21, 40])
def test_hybrid_mask_matches_per_position_rule(window):
    T = 20
    mask = attention_mask(T, T, window, "cpu")
    for i, j in itertools.product(range(T), range(T)):
        assert mask[i, j] == (j <= i and j > i - window)
    tail = attention_mask(3, T, window, "cpu")  # queries at the end of a longer key span
    assert torch.equal(tail, mask[-3:])


@pytest.mark.parametrize("t_q", [1, 2, 7])
@pytest.mark.parametrize("window", [None, 1, 3, 9, 30])
def test_attend_queries_at_the_end_of_a_longer_key_span_follow_the_window(t_q, window):
    """The shape of a suffix scored after a shared prefix (scoring.SharedPrefix): a few queries over all the keys."""
    from model import attend
    t_k, H, Hkv, D = 9, 4, 2, 8
    q, k, v = torch.randn(2, H, t_q, D), torch.randn(2, Hkv, t_k, D), torch.randn(2, Hkv, t_k, D)
    want = torch.empty(2, H, t_q, D, dtype=torch.float64)
    for i, h in itertools.product(range(t_q), range(H)):  # query i sits at key position t_k - t_q + i
        pos = t_k - t_q + i
        keys = [j for j in range(t_k) if j <= pos and (window is None or j > pos - window)]
        s = torch.einsum("bd,bjd->bj", q[:, h, i].double(), k[:, h // 2, keys].double()) / math.sqrt(D)
        want[:, h, i] = torch.einsum("bj,bjd->bd", s.softmax(-1), v[:, h // 2, keys].double())
    torch.testing.assert_close(attend(q, k, v, window, "sdpa").double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [
    dict(n_kv_head=4), dict(n_kv_head=2, mlp="swiglu"), dict(n_kv_head=1),
    dict(n_kv_head=1, attn_pattern="LLG", local_window=5, kv_share=2),
    dict(n_kv_head=2, attn_pattern="LG", local_window=3, kv_share=2, share_global_kv=True, n_layer=6),
    dict(n_kv_head=1, attn_pattern="L", local_window=40, qk_norm=False, tie_embeddings=True),
    dict(n_kv_head=2, n_expert=4, n_expert_active=2, n_shared_expert=1, n_dense_layers=1, attn_pattern="LG",
         local_window=4),
    dict(n_kv_head=2, value_embeds=1, logit_softcap=3.0, n_layer=5),  # the speedrun flags
    dict(n_kv_head=1, value_embeds=2, attn_pattern="LLG", local_window=4, kv_share=2, n_layer=6),
])
def test_forward_matches_naive_float64_reference(kw):
    model = randomize_norms(GPT(tiny(**kw))).double()
    idx = torch.randint(0, 37, (2, 13))
    logits = model.logits(model(idx))
    # the model keeps RoPE tables in fp32 by design (measured error ~2e-8); a window off by one moves
    # logits by ~3e-2, so 1e-6 leaves margin on both sides
    assert (logits.double() - naive_forward(model, idx)).abs().max() < 1e-6


def test_shared_kv_consumers_own_no_kv_and_gradients_reach_producer():
    cfg = tiny(n_layer=6, attn_pattern="LLG", local_window=4, kv_share=2, share_global_kv=True, n_kv_head=1)
    model = GPT(cfg)
    assert [(k, g, p) for k, g, p in layer_plan(cfg)] == [
        ("L", 0, True), ("L", 0, False), ("G", 1, True), ("L", 2, True), ("L", 2, False), ("G", 1, False)]
    for block, (_, _, produces) in zip(model.blocks, layer_plan(cfg)):
        assert hasattr(block.attn, "k_proj") == produces and hasattr(block.attn, "v_proj") == produces
    dense = GPT(tiny(n_layer=6, n_kv_head=1))
    kv_params = 2 * cfg.n_embd * cfg.head_dim + cfg.head_dim  # k_proj + v_proj + k_norm per layer
    assert dense.num_params() - model.num_params() == 3 * kv_params
    # only the last layer (a consumer of the global group) can push gradient into layer 2's K/V through sharing
    idx = torch.randint(0, 37, (2, 10))
    model.zero_grad()
    out = model.blocks[5].attn
    x = torch.randn(2, 10, 32, requires_grad=True)
    from model import rope_tables
    cos, sin = rope_tables(0, 10, cfg.head_dim, cfg.rope_theta, "cpu")
    _, kv = model.blocks[2].attn(x, cos, sin, None, None)
    out(torch.randn(2, 10, 32), cos, sin, kv, None)[0].sum().backward()
    assert model.blocks[2].attn.k_proj.weight.grad.abs().sum() > 0
    assert model.blocks[2].attn.q_proj.weight.grad is None  # the producer's own query took no part
    ce, _ = model(idx, idx)
    ce.backward()


@pytest.mark.parametrize("bad, message", [
    (dict(attn_pattern="LLX"), "may only contain L"), (dict(attn_pattern=""), "may only contain L"),
    (dict(n_kv_head=3), "multiple of n_kv_head"), (dict(n_expert=4, n_expert_active=5), "between 1 and n_expert"),
    (dict(kv_share=0), "kv_share must be >= 1"), (dict(mlp="gelu"), "mlp must be"),
    (dict(local_window=0), "local_window"),
])
def test_bad_configs_fail_at_construction(bad, message):
    with pytest.raises(ValueError, match=message):
        tiny(**bad)


def test_moe_routing_matches_per_token_reference_and_drops_nothing():
    cfg = tiny(n_expert=6, n_expert_active=2, n_shared_expert=1, mlp="swiglu", n_dense_layers=0)
    moe = MoE(cfg).double()
    for p in (moe.w_up, moe.w_down):
        torch.nn.init.normal_(p, std=0.1)
    moe.bias.copy_(torch.randn(6) * 0.1)  # the bias changes selection but not gate values
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    moe.train()
    assert torch.allclose(moe(x)[0], naive_moe(moe, x), atol=1e-10)
    assert moe.load.sum() == 3 * 7 * 2  # every token reached k experts: nothing dropped


def test_single_expert_top1_equals_dense_mlp():
    cfg = tiny(n_expert=1, n_expert_active=1, n_shared_expert=0, mlp="relu2", n_dense_layers=0)
    moe = MoE(cfg)
    dense = GPT(tiny(mlp="relu2", mlp_hidden=cfg.expert_hidden)).blocks[0].mlp
    dense.up_proj.weight.data.copy_(moe.w_up[0])
    dense.down_proj.weight.data.copy_(moe.w_down[0])
    x = torch.randn(2, 5, 32)
    assert torch.allclose(moe(x)[0], dense(x)[0], atol=1e-6)


def test_bias_update_balances_a_skewed_router():
    cfg = tiny(n_expert=4, n_expert_active=1, n_shared_expert=0, moe_bias_gamma=0.005, n_dense_layers=0)
    moe = MoE(cfg).train()
    with torch.no_grad():
        moe.router.weight.normal_(std=0.02)
        moe.router.weight[0] += 0.05  # expert 0 wins most tokens (inputs are positive)
    x = torch.randn(4, 32, 32).abs()
    moe(x)
    first = moe.load.clone()
    moe.update_bias(moe.load)
    settled = torch.zeros(4)
    for step in range(250):
        moe(x)
        if step >= 200:  # sign updates oscillate around balance: judge the load summed over the last 50 steps
            settled += moe.load
        moe.update_bias(moe.load)
    assert first.max() / first.mean() > 2.5 and settled.max() / settled.mean() < 1.3


def test_moe_balance_loss_is_returned_in_training_only_and_never_added_to_the_cross_entropy():
    model = GPT(tiny(n_expert=4, n_expert_active=2, moe_aux_alpha=0.5, n_dense_layers=0)).train()
    idx = torch.randint(0, 37, (2, 12))
    ce_train, balance = model(idx, idx)
    ce_eval, no_balance = model.eval()(idx, idx)
    assert balance > 0 and no_balance == 0 and torch.equal(ce_train, ce_eval)
    dense_balance = GPT(tiny()).train()(idx, idx)[1]
    assert dense_balance == 0


def test_moe_balance_loss_equals_deepseek_v3_formula_in_float64(seed):
    """Sequence-wise balance loss, by hand: alpha * mean over sequences of sum_i f_i P_i, f_i = E/(k T) * tokens of
    the sequence routed to i, P_i = the mean over the sequence of the normalised router scores, summed over layers."""
    E, k, alpha = 5, 2, 0.3
    model = GPT(tiny(n_expert=E, n_expert_active=k, moe_aux_alpha=alpha, n_dense_layers=1, n_layer=3)).double()
    idx = torch.randint(0, 37, (3, 11))
    captured = []
    for block in model.blocks[1:]:
        block.mlp.router.register_forward_hook(lambda mod, inp, out: captured.append(out.detach()))
    _, balance = model.train()(idx, idx)
    want = 0.0
    for moe, logits in zip(model.moe_layers(), captured):
        scores = torch.sigmoid(logits).view(3, 11, E)
        chosen = (scores + moe.bias).topk(k, dim=-1).indices
        for b in range(3):
            f = torch.zeros(E, dtype=torch.float64)
            for t in range(11):
                f[chosen[b, t]] += E / (k * 11)
            p = (scores[b] / scores[b].sum(-1, keepdim=True)).mean(0)
            want += alpha * (f * p).sum().item() / 3
    assert balance.item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("heads, pattern, share, experts", itertools.product(
    [1, 2], ["G", "LLG"], [(1, False), (2, True)], [0, 4]))
def test_cached_generation_equals_full_forward(heads, pattern, share, experts):
    cfg = tiny(n_kv_head=heads, attn_pattern=pattern, local_window=5, kv_share=share[0], share_global_kv=share[1],
               n_expert=experts, n_layer=6, n_dense_layers=1, block_size=40)
    model = GPT(cfg).eval()
    prompt = torch.randint(0, 37, (2, 9))  # longer than the window: the ring buffer wraps
    cache = KVCache(cfg)
    logits = model.logits(model(prompt, cache=cache)[:, -1])
    seq = prompt
    for _ in range(12):
        full = model.logits(model(seq)[:, -1])
        assert torch.allclose(logits, full, atol=1e-5, rtol=1e-4)
        nxt = full.argmax(-1, keepdim=True)
        seq = torch.cat((seq, nxt), 1)
        logits = model.logits(model(nxt, cache=cache)[:, -1])
    assert torch.equal(model.generate(prompt, 12), seq)


def test_generation_past_block_size_rebuilds_the_cache():
    model = GPT(tiny(block_size=16)).eval()
    out = model.generate(torch.randint(0, 37, (1, 10)), 30, sampler(SamplingParams(top_k=5, top_p=0.9)))
    assert out.shape == (1, 40)


def test_tiny_model_overfits_one_batch():
    model = GPT(tiny(n_kv_head=1, attn_pattern="LG", local_window=8, kv_share=2))
    idx = torch.randint(0, 37, (4, 32))
    opt = build_optimizer("adamw", model, 3e-3, 0.0, (0.9, 0.95), {}, "cpu")
    for _ in range(150):
        ce, _ = model(idx[:, :-1], idx[:, 1:])
        loss = ce / idx[:, 1:].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_flops_count_visible_keys():
    cfg = tiny(attn_pattern="LG", local_window=4, n_layer=2)
    model = GPT(cfg)
    T = 10
    visible = [sum(1 for i in range(T) for j in range(T) if j <= i and j > i - w) / T for w in (4, T)]
    expected = 6 * model.num_params(active=True) + sum(12 * cfg.n_head * cfg.head_dim * v for v in visible)
    assert model.flops_per_token(T) == pytest.approx(expected)


def test_kv_cache_bytes_for_the_7b_shape():
    shape = dict(n_layer=32, n_embd=4096, n_head=32, block_size=8192, vocab_size=50257)
    ours = GPTConfig(**shape, n_kv_head=1, attn_pattern="LLLLLG", local_window=1024, kv_share=2, share_global_kv=True)
    gqa8 = GPTConfig(**shape, n_kv_head=8)
    # 16 local groups x 1024 positions + 1 global group x 8192 positions, 512 bytes each (K+V, bf16, 1 head of 128)
    assert KVCache.bytes_at(ours, 8192) == (16 * 1024 + 8192) * 512
    assert KVCache.bytes_at(gqa8, 8192) == 32 * 8192 * 2 * 8 * 128 * 2
    assert KVCache.bytes_at(gqa8, 8192) / KVCache.bytes_at(ours, 8192) > 50


def test_triton_attention_trains_and_generates_like_sdpa(monkeypatch):
    """The hybrid / shared-KV / GQA model through the Triton kernel (interpreter on CPU) against PyTorch SDPA; the
    cached decode steps go through the decode kernel."""
    from nanokernels import attention
    decode_calls = []
    monkeypatch.setattr(attention, "flash_decode", lambda *a, **kw: decode_calls.append(1) or flash_decode(*a, **kw))
    cfg = tiny(n_layer=3, n_head=2, n_kv_head=1, attn_pattern="LLG", local_window=5, kv_share=2, block_size=24)
    ref = GPT(cfg)
    tri = GPT(cfg, attn_impl="triton")
    tri.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 37, (2, 20))
    for m in (ref, tri):
        loss = m(idx[:, :-1], idx[:, 1:])[0] / idx[:, 1:].numel()
        loss.backward()
    assert abs(loss.item() - ref(idx[:, :-1], idx[:, 1:])[0].item() / idx[:, 1:].numel()) < 1e-5
    for (name, a), b in zip(ref.named_parameters(), tri.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name
    prompt = idx[:, :8]  # longer than the window: the decode steps read the ring buffer
    assert torch.equal(ref.eval().generate(prompt, 10), tri.eval().generate(prompt, 10))
    assert len(decode_calls) == 9 * 3  # 9 decode steps after the prefill, 3 layers


def test_checkpointed_moe_leaves_no_balance_loss_for_eval():
    model = GPT(tiny(n_layer=2, n_expert=4, n_dense_layers=0, moe_aux_alpha=0.5))
    for block in model.blocks:
        block.checkpoint = True
    idx = torch.randint(0, 37, (2, 12))
    ce, balance = model.train()(idx, idx)
    (ce + balance).backward()  # the backward recompute runs MoE.forward again in training mode
    assert balance > 0 and model.eval()(idx, idx)[1].item() == 0


def test_zero_init_projections_start_at_zero_and_leave_the_rest():
    model = GPT(tiny(zero_init_proj=True, n_expert=4, n_dense_layers=1, value_embeds=1))
    for name, p in model.named_parameters():
        writer = name.endswith(("o_proj.weight", "down_proj.weight", "w_down"))
        assert (p.abs().max() == 0) == writer, name


def test_cached_generation_with_value_embeddings_and_softcap_equals_full_forward():
    cfg = tiny(value_embeds=2, logit_softcap=4.0, n_kv_head=1, attn_pattern="LLG", local_window=5, block_size=40)
    model = randomize_norms(GPT(cfg)).eval()
    prompt, seq = torch.randint(0, 37, (2, 9)), None
    seq = model.generate(prompt, 10)
    for t in range(9, 19):  # each cached step chose the argmax of the uncached forward over its prefix
        assert torch.equal(model.logits(model(seq[:, :t])[:, -1]).argmax(-1), seq[:, t])


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])  # fp32: sums reordered
@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_chunked_loss_and_gradients_equal_the_unchunked_ones(monkeypatch, dtype, tol, softcap):
    import model as model_module
    monkeypatch.setattr(model_module, "LOSS_CHUNK_ELEMENTS", 37 * 7)  # 7 rows per chunk: 26 rows -> 4 chunks
    model = randomize_norms(GPT(tiny(logit_softcap=softcap, tie_embeddings=softcap > 0))).to(dtype)
    idx = torch.randint(0, 37, (2, 13))
    targets = torch.randint(0, 37, (2, 13))
    targets[0, :4] = targets[1, -3:] = -1  # ignored positions (masked SFT tokens, padding)
    weights = torch.rand(2, 13, dtype=dtype)  # per-token losses get a gradient of their own (as DPO's do)

    def reference(reduction):  # the whole logits, torch's cross-entropy
        logits = model.logits(model(idx))
        per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")
        per_token = per_token.view(2, 13)
        return {"mean": per_token.sum() / (targets >= 0).sum(), "sum": per_token.sum(), "none": per_token}[reduction]

    def value_and_grads(loss):
        model.zero_grad()
        (loss * weights).sum().backward() if loss.dim() else loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]
    for reduction in ("mean", "sum", "none"):
        want, want_grads = value_and_grads(reference(reduction))
        ce = model(idx, targets, per_token=reduction == "none")[0]
        got, got_grads = value_and_grads(ce / (targets >= 0).sum() if reduction == "mean" else ce)
        assert got.shape == want.shape and (got - want).abs().max() <= tol * want.abs().max()
        for g, w in zip(got_grads, want_grads):
            assert (g - w).abs().max() <= tol * max(w.abs().max(), 1e-30), (reduction, (g - w).abs().max())


@pytest.mark.parametrize("temperature", [1e-50, 1e-30, 5e-324])
def test_a_vanishing_temperature_samples_the_argmax_without_nan(seed, temperature):
    logits = torch.randn(4, 37) * 30
    logits[:, 5:] = float("-inf")  # a padded vocabulary's masked rows
    tokens = next_tokens(logits, SamplingParams(temperature=temperature, top_k=10, top_p=0.9))
    assert torch.equal(tokens, logits.argmax(-1))


def test_generate_tokens_yields_the_steps_of_generate(seed):
    model = GPT(tiny(block_size=16)).eval()
    prompt = torch.randint(0, 37, (2, 5))
    steps = list(model.generate_tokens(prompt, 20))  # past block_size: the cache is rebuilt
    assert len(steps) == 20 and all(s.shape == (2, 1) for s in steps)
    assert torch.equal(torch.cat([prompt, *steps], 1), model.generate(prompt, 20))
