"""Multi-token prediction (model.py MTPModule, nanogpt/objectives.py): the shifted targets, lambda = 0 equals no
MTP, the objective's weighting, FLOPs, and self-speculative decoding equal to greedy decoding."""
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, rope_tables, visible_pairs
from nanogpt.objectives import make_objective
from nanogpt.optim import build_optimizer
from tests.conftest import TINY, assert_one_clear_line, run_script


def tiny(**kw):
    args = dict(block_size=24, vocab_size=13, n_layer=2, n_embd=16, n_head=2, mlp="swiglu")
    return GPTConfig(**{**args, **kw})


def tables(model, length):
    return rope_tables(0, length, model.config.rope_dim, model.config.rope_theta, "cpu")


def test_each_depth_reads_and_predicts_the_right_tokens():
    """Hand-built: idx = 10..14, targets = 11..15. Depth k embeds tokens idx[k:] and is scored on targets[k:]:
    depth 1 at position i reads token i+1 and predicts token i+2."""
    model = GPT(tiny(vocab_size=16, mtp_depth=2)).double()
    embedded, scored = [], []
    model.wte.register_forward_hook(lambda m, inp, out: embedded.append(inp[0].tolist()))
    model.lm_head.register_forward_hook(lambda m, inp, out: scored.append(inp[1].tolist()))
    idx, targets = torch.tensor([[10, 11, 12, 13, 14]]), torch.tensor([[11, 12, 13, 14, 15]])
    ce, _, mtp_ce = model(idx, targets, mtp=True)
    assert embedded == [[[10, 11, 12, 13, 14]], [[11, 12, 13, 14]], [[12, 13, 14]]]
    assert scored == [[11, 12, 13, 14, 15], [12, 13, 14, 15], [13, 14, 15]]
    assert mtp_ce.shape == (2,) and torch.isfinite(mtp_ce).all()


def test_depth_one_never_sees_the_token_it_predicts(seed):
    """Changing token i+2 changes nothing at depth-1 positions <= i (it predicts token i+2 from tokens <= i+1)."""
    model = GPT(tiny(mtp_depth=1)).double().eval()
    idx = torch.randint(0, 13, (1, 12))
    changed = idx.clone()
    changed[0, 7] = (idx[0, 7] + 1) % 13

    def depth_one(tokens):
        _, last = model(tokens, mtp=True)
        return next(model.mtp_states(last, tokens, *tables(model, tokens.size(1))))[1]
    a, b = depth_one(idx), depth_one(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=0)
    assert not torch.allclose(a[:, 6], b[:, 6])  # position 6 reads token 7


def test_ignored_targets_are_not_scored(seed):
    model = GPT(tiny(mtp_depth=2)).double()
    idx = torch.randint(0, 13, (2, 10))
    targets = torch.full_like(idx, -1)
    _, _, mtp_ce = model(idx, targets, mtp=True)
    assert mtp_ce.tolist() == [0.0, 0.0]
    targets[1, 6] = 3  # depth 1 scores it at position 5, depth 2 at position 4
    _, _, mtp_ce = model(idx, targets, mtp=True)
    _, last = model(idx, mtp=True)
    states = {k: h for k, h, _ in model.mtp_states(last, idx, *tables(model, 10))}
    expect = [F.cross_entropy(model.logits(states[1][1, 5])[None], torch.tensor([3])),
              F.cross_entropy(model.logits(states[2][1, 4])[None], torch.tensor([3]))]
    torch.testing.assert_close(mtp_ce, torch.stack(expect))


def test_objective_adds_lambda_times_the_mean_depth_loss_per_main_target(seed):
    model = GPT(tiny(mtp_depth=2)).double()
    idx, targets = torch.randint(0, 13, (2, 9)), torch.randint(0, 13, (2, 9))
    ce, balance, mtp_ce = model(idx, targets, mtp=True)
    weight = 1 / 18  # the micro-batch's 18 counted main targets
    loss, stats = make_objective("next_token", model, 1, mtp_weight=lambda: 0.3)((idx, targets), weight)
    torch.testing.assert_close(loss, (ce + 0.3 * (mtp_ce[0] + mtp_ce[1]) / 2) * weight + balance)
    assert set(stats) == {"loss", "mtp_loss"}


def test_lambda_zero_trains_exactly_like_the_model_without_mtp(seed):
    """Same seed: the main weights start equal (MTP is built after the head) and, at lambda = 0, stay equal."""
    models = []
    for depth in (0, 2):
        torch.manual_seed(seed)
        models.append(GPT(tiny(mtp_depth=depth)).double())
    plain, mtp = models
    assert all(torch.equal(p, mtp.state_dict()[k]) for k, p in plain.state_dict().items())
    data = [(torch.randint(0, 13, (2, 12)), torch.randint(0, 13, (2, 12))) for _ in range(3)]
    for model in models:
        opt = build_optimizer("muon", model, 1e-2, 0.1, (0.9, 0.95), {}, "cpu")
        objective = make_objective("next_token", model, 1, mtp_weight=lambda: 0.0)
        for batch in data:
            loss, _ = objective(batch, 1 / 24)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert all(torch.equal(p, mtp.state_dict()[k]) for k, p in plain.state_dict().items())
    assert all(p.grad is None for p in mtp.mtp.parameters())


def test_flops_count_the_mtp_blocks_and_their_use_of_the_head():
    cfg = tiny(mtp_depth=2)
    plain, mtp = GPT(tiny()), GPT(cfg)
    extra_params = sum(p.numel() for p in mtp.mtp.parameters())
    attn = 2 * 12 * cfg.n_head * cfg.head_dim * visible_pairs(24, None) / 24
    expect = plain.flops_per_token(24) + 6 * (extra_params + 2 * cfg.vocab_size * cfg.n_embd) + attn
    assert abs(mtp.flops_per_token(24) - expect) < 1e-6 * expect


def test_speculative_decoding_gives_greedy_tokens_whatever_the_drafts(seed, monkeypatch):
    model = GPT(tiny(mtp_depth=3)).double().eval()
    prompt = torch.randint(0, 13, (1, 5))
    reference = model.generate(prompt, 40)  # past block_size 24: the cache restarts
    steps = list(model.generate_speculative(prompt, 40))
    assert torch.equal(torch.cat([prompt] + [s for s, _ in steps], dim=1), reference)

    # oracle drafts (the true continuation, past block_size too): all accepted
    made = {"length": prompt.size(1)}

    def oracle(last, tokens):
        return reference[:, made["length"]:made["length"] + 3]

    def run(n):
        out = [prompt]
        for tokens, counts in model.generate_speculative(prompt, n):
            out.append(tokens)
            made["length"] += tokens.size(1)
            yield tokens, counts
    monkeypatch.setattr(model, "mtp_drafts", oracle)
    steps = list(run(40))
    assert torch.equal(torch.cat([prompt] + [s for s, _ in steps], dim=1), reference)
    assert all(ok == n for _, (ok, n) in steps) and max(s.size(1) for s, _ in steps) == 4

    # half-wrong drafts: the first is right, the rest wrong
    made["length"] = prompt.size(1)
    monkeypatch.setattr(model, "mtp_drafts", lambda last, tokens: torch.cat(
        (oracle(last, tokens)[:, :1], (oracle(last, tokens)[:, 1:] + 1) % 13), dim=1))
    steps = list(run(40))
    assert torch.equal(torch.cat([prompt] + [s for s, _ in steps], dim=1), reference)
    assert all(ok == min(n, 1) for _, (ok, n) in steps)


def test_mla_model_drafts_and_decodes_greedily(seed):
    """MTP over multi-head latent attention: RoPE covers only MLA's rope part, in the drafts too."""
    model = GPT(tiny(mtp_depth=2, kv_lora_rank=8, qk_norm=False)).double().eval()
    prompt = torch.randint(0, 13, (1, 4))
    steps = list(model.generate_speculative(prompt, 30))
    assert torch.equal(torch.cat([prompt] + [s for s, _ in steps], dim=1), model.generate(prompt, 30))


def test_bad_settings_get_one_line(tmp_path):
    result = run_script("train.py", *TINY, "--mtp_depth=-1", f"--out_dir={tmp_path / 'o'}", check=False)
    assert_one_clear_line(result, "mtp_depth")
    result = run_script("sample.py", f"--out_dir={tmp_path}", "--speculative=True", check=False)
    assert_one_clear_line(result, "--temperature=0")
