"""Triton flash attention (nanokernels/attention.py) against a float64 reference: forward and dq/dk/dv, causal and
sliding-window masks, MQA/GQA, tails, KV-cache prefill and decode, strided inputs, dtypes, both load paths (TMA
descriptors and plain loads), the split MQA backward, atomic and deterministic dQ, 64-bit offsets, the
block-skipping bounds, errors.

On CPU the kernels run in the Triton interpreter (tests/conftest.py) with 16 x 16 blocks, so the small shapes here
still cover several blocks and ragged tails. Inputs are fresh each run: the seed is printed (pytest shows it for a
failing test); replay with TEST_SEED=<seed>.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl
from conftest import ROOT

from nanokernels import attention
from nanokernels.attention import _key_ranges, _query_ranges, attention_reference, flash_attention, flash_decode

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
# Bounds on ||x - ref|| / ||ref|| and on max|x - ref| / max|ref|, ref in float64 from the same (rounded) inputs.
# Worst seen in the interpreter over the cases below and many seeds: fp32 3.4e-7 / 4.5e-7, fp16 3.8e-4 / 5.9e-4,
# bf16 3.0e-3 / 6.0e-3 (about what rounding P, dS and the results to bf16 costs). A mask one key off,
# a wrong head mapping or a wrong scale costs 0.3 or more (test_check_catches_wrong_masks_and_head_mapping).
REL_TOL = {f32: 5e-6, f16: 1e-3, bf16: 5e-3}
MAX_TOL = {f32: 1e-5, f16: 2e-3, bf16: 1.5e-2}


def rel_errors(x, ref, scale=None):
    """||x - ref|| / ||scale|| and max|x - ref| / max|scale|, scale = ref unless given."""
    x, ref = x.double(), ref.double()
    scale = ref if scale is None else scale.double()
    return ((x - ref).norm() / scale.norm()).item(), ((x - ref).abs().max() / scale.abs().max()).item()


def assert_close(x, ref, name, dtype, scale=None):
    assert x.shape == ref.shape, f"{name}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(x).all(), f"{name}: non-finite values"
    assert (ref if scale is None else scale).norm() > 0, f"{name}: zero reference, the comparison would be vacuous"
    rel, worst = rel_errors(x, ref, scale)
    print(f"{name:4s} {str(dtype):15s} rel {rel:.2e}  max {worst:.2e}")
    bounds = f"bounds {REL_TOL[dtype]:.0e} and {MAX_TOL[dtype]:.0e}"
    assert rel < REL_TOL[dtype] and worst < MAX_TOL[dtype], f"{name}: rel error {rel:.2e}, max {worst:.2e}; {bounds}"


def make(B, H, T, D, dtype, layout, device=DEVICE):
    """A (B, H, T, D) leaf tensor: contiguous, a transposed (B, T, H, D) buffer as the model makes, or a view with
    gaps in every dimension (head dim stride 2, a slice of a longer cache)."""
    if layout == "contiguous":
        x = torch.randn(B, H, T, D, device=device, dtype=dtype)
    elif layout == "bthd":
        x = torch.randn(B, T, H, D, device=device, dtype=dtype).transpose(1, 2)
    elif layout == "strided":
        x = torch.randn(B, H + 1, T + 5, 2 * D, device=device, dtype=dtype)[:, 1:, 3:T + 3, ::2]
    else:
        raise ValueError(layout)
    assert x.shape == (B, H, T, D)
    return x.requires_grad_()


def check_against_reference(q, k, v, window, deterministic=False):
    """Output and dq, dk, dv (for a random upstream gradient) against attention_reference in float64."""
    dtype = q.dtype
    out = flash_attention(q, k, v, window, deterministic)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = attention_reference(q64, k64, v64, window)
    assert out.dtype == dtype
    assert_close(out, ref, "out", dtype)
    g = torch.randn_like(out)  # a random upstream gradient, in the input dtype
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), g.double())
    for name, x, r in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert x.dtype == dtype
        # one visible key per query (window = 1, or T = 1) gives out = v, so dq = dk = 0 exactly: measure their
        # noise on the scale of dv instead
        one_key = window == 1 or k.size(2) == 1
        assert_close(x, r, name, dtype, scale=rv if one_key and name != "dv" else None)


CASES = [  # B, Hq, Hkv, Tq, Tk, D, window, dtype, layout
    (1, 2, 2, 37, 37, 32, None, f32, "contiguous"),  # MHA, ragged tail
    (2, 4, 1, 50, 50, 64, None, f32, "contiguous"),  # MQA, batch 2
    (1, 4, 2, 64, 64, 32, 16, f32, "contiguous"),  # GQA, window a multiple of the block
    (1, 4, 2, 50, 50, 32, 7, f32, "bthd"),  # window smaller than a block, transposed inputs
    (1, 2, 1, 37, 37, 32, 37, f32, "contiguous"),  # window = T
    (1, 2, 2, 37, 37, 32, 100, f32, "contiguous"),  # window > T
    (1, 2, 2, 33, 33, 32, 1, f32, "contiguous"),  # window = 1: each query sees only itself
    (1, 1, 1, 1, 1, 16, None, f32, "contiguous"),  # a single position, D = 16
    (1, 4, 2, 20, 50, 32, None, f32, "contiguous"),  # prefill: Tq < Tk, diagonal aligned to the end
    (1, 4, 2, 19, 45, 32, 10, f32, "strided"),  # prefill with a window, gaps in every stride
    (1, 2, 1, 1, 45, 32, 16, f32, "contiguous"),  # one decode step
    (1, 4, 2, 50, 50, 64, 20, bf16, "bthd"),
    (2, 4, 4, 37, 37, 32, None, bf16, "contiguous"),
    (1, 4, 2, 30, 47, 32, 12, bf16, "strided"),
    (1, 4, 1, 64, 64, 64, 24, f16, "contiguous"),
    (1, 2, 2, 40, 40, 64, None, f16, "bthd"),
    (1, 4, 2, 24, 64, 64, None, f16, "strided"),  # fp16 prefill
    (1, 2, 1, 40, 40, 128, 13, bf16, "bthd"),  # the model's head dim
    (1, 4, 1, 100, 100, 32, 33, bf16, "contiguous"),  # 7 x 7 blocks, window across three of them
]


@pytest.mark.parametrize("B,Hq,Hkv,Tq,Tk,D,window,dtype,layout", CASES)
def test_matches_reference(seed, B, Hq, Hkv, Tq, Tk, D, window, dtype, layout):
    """The default path: TMA loads where the layout and dtype allow (bf16 / fp16, all but "strided"), dQ added with
    atomics at D <= 64, and the backward split over the group's query heads wherever Hq > Hkv (the interpreter
    plans for 132 SMs)."""
    q = make(B, Hq, Tq, D, dtype, layout)
    k, v = make(B, Hkv, Tk, D, dtype, layout), make(B, Hkv, Tk, D, dtype, layout)
    assert attention._use_tma(q, k, v) == (layout != "strided" and dtype != f32)
    check_against_reference(q, k, v, window)


PATH_CASES = [  # B, Hq, Hkv, Tq, Tk, D, window, dtype
    (1, 4, 1, 50, 50, 32, None, bf16),  # MQA
    (2, 6, 2, 37, 45, 64, 12, bf16),  # GQA with 3 query heads per K/V head, prefill with a window, batch 2
    (1, 2, 2, 40, 40, 16, 100, f16),  # MHA, window > T
]


@pytest.mark.parametrize("tma", [True, False])
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("sm_count", [0, 132])
@pytest.mark.parametrize("B,Hq,Hkv,Tq,Tk,D,window,dtype", PATH_CASES)
def test_every_path_matches_reference(seed, monkeypatch, tma, deterministic, sm_count, B, Hq, Hkv, Tq, Tk, D, window,
                                      dtype):
    """Each combination of load path (TMA or plain), dQ (separate kernel or atomics) and backward split (one program
    per K/V block when there are no SMs to fill, else one per query head of the group) on the same inputs."""
    monkeypatch.setattr(attention, "TMA_LOADS", tma)
    monkeypatch.setattr(attention, "_sm_count", lambda device: sm_count)
    q = make(B, Hq, Tq, D, dtype, "bthd")
    k, v = make(B, Hkv, Tk, D, dtype, "bthd"), make(B, Hkv, Tk, D, dtype, "bthd")
    assert attention._use_tma(q, k, v) == (tma and dtype != f32)
    assert attention._kv_split(B, Hkv, Tk, Hq // Hkv, q.device) == (1 if sm_count == 0 else Hq // Hkv)
    check_against_reference(q, k, v, window, deterministic)


def test_autotuning_adds_nothing_into_the_atomic_dq(seed, monkeypatch):
    """On a GPU the dK/dV kernel is tuned over several configs, each timed by running it; with the atomic dQ
    (D <= 64) every timed run would add into dQ unless the tuner zeroes it first (reset_to_zero; seen on an H200:
    test_gradients_real_sizes_cuda's D = 64 case). The interpreter has one config and never times, so here the
    kernel's own tuner gets it twice and a 'timer' that runs each three times."""
    tuner = attention._bwd_dkdv_kernel

    def run_three_times(kernel_call, quantiles):
        for _ in range(3):
            kernel_call()
        return [1.0, 1.0, 1.0]
    monkeypatch.setattr(tuner, "configs", tuner.configs * 2)
    monkeypatch.setattr(tuner, "cache", {})
    monkeypatch.setattr(tuner, "_do_bench", run_three_times)
    q = make(1, 4, 37, 32, bf16, "bthd")
    k, v = make(1, 2, 37, 32, bf16, "bthd"), make(1, 2, 37, 32, bf16, "bthd")
    check_against_reference(q, k, v, None)
    assert len(tuner.cache) == 1  # it did tune


def test_split_plan():
    """The dK/dV split fills two programs per SM and never exceeds the group; decode splits cover every key once."""
    cpu = torch.device("cpu")
    assert attention._kv_split(1, 1, 8192, 32, cpu) == 5  # 64 key blocks, 264 programs wanted: 5 per block
    assert attention._kv_split(1, 8, 8192, 4, cpu) == 1  # 512 programs already
    assert attention._kv_split(4, 1, 100, 2, cpu) == 2  # never more than the group's query heads
    for programs, keys in [(1, 1), (1, 45), (8, 1000), (1, 100_000), (300, 70)]:
        n_splits, per_split = attention._decode_splits(programs, keys, cpu)
        assert 1 <= n_splits <= attention._MAX_DECODE_SPLITS and per_split % attention._DECODE_GRANULE == 0
        assert (n_splits - 1) * per_split < keys <= n_splits * per_split  # no empty split, every key in one


def test_deterministic_gradients_are_reproducible(seed):
    """deterministic=True: no atomics, so two backward passes agree bit for bit (the atomic dQ may not on a GPU;
    in the interpreter both paths are sequential, so only a GPU run can catch a lost determinism)."""
    q, k, v = make(1, 4, 64, 32, f32, "bthd"), make(1, 1, 64, 32, f32, "bthd"), make(1, 1, 64, 32, f32, "bthd")
    g = torch.randn(1, 4, 64, 32, device=DEVICE)
    runs = [torch.autograd.grad(flash_attention(q, k, v, 20, deterministic=True), (q, k, v), g) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_window_covering_all_keys_is_causal(seed):
    q, k, v = (torch.randn(1, 2, 37, 32, device=DEVICE) for _ in range(3))
    causal = flash_attention(q, k, v)
    assert torch.equal(flash_attention(q, k, v, window=37), causal)
    assert torch.equal(flash_attention(q, k, v, window=1000), causal)
    assert not torch.equal(flash_attention(q, k, v, window=36), causal)


def test_output_is_laid_out_for_the_output_projection(seed):
    q, k, v = (torch.randn(2, 4, 20, 32, device=DEVICE) for _ in range(3))
    out = flash_attention(q, k, v)
    assert out.shape == (2, 4, 20, 32) and out.transpose(1, 2).is_contiguous()  # so .reshape(B, T, C) is a view


def test_expanded_upstream_gradient(seed):
    """out.sum() hands backward a dO with all strides 0; the kernels read it through its strides."""
    q, k, v = (make(1, 2, 40, 32, f32, "contiguous") for _ in range(3))
    flash_attention(q, k, v, window=9).sum().backward()
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    attention_reference(q64, k64, v64, window=9).sum().backward()
    for name, x, r in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        assert_close(x, r, name, f32)


def test_only_the_needed_gradients(seed):
    """With k, v frozen the dK/dV kernel is skipped; dQ must not depend on it."""
    q = make(1, 4, 30, 32, f32, "contiguous")
    k, v = (torch.randn(1, 2, 30, 32, device=DEVICE) for _ in range(2))
    g = torch.randn(1, 4, 30, 32, device=DEVICE)
    (dq,) = torch.autograd.grad(flash_attention(q, k, v, 11), (q,), g)
    q64 = q.detach().double().requires_grad_()
    (rq,) = torch.autograd.grad(attention_reference(q64, k.double(), v.double(), 11), (q64,), g.double())
    assert_close(dq, rq, "dq", f32)


def test_custom_ops_fake_versions_match():
    """torch.compile traces the kernels through their fake versions: shapes, strides, dtypes must equal the real."""
    q = make(1, 4, 21, 32, f32, "bthd").detach()  # the ops have no autograd formula: _FlashAttention is theirs
    k, v = (make(1, 2, 21, 32, f32, "strided").detach() for _ in range(2))
    checks = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.nanogpt_attention.forward, (q, k, v, 5), test_utils=checks)
    o, lse = torch.ops.nanogpt_attention.forward(q, k, v, 5)
    for need_dq, need_dkdv, deterministic in ((True, True, False), (True, True, True), (True, False, False),
                                              (False, True, False)):
        torch.library.opcheck(torch.ops.nanogpt_attention.backward, (q, k, v, o, lse, torch.randn_like(o), 5,
                                                                     need_dq, need_dkdv, deterministic),
                              test_utils=checks)
    torch.library.opcheck(torch.ops.nanogpt_attention.decode, (q[:, :, -1:], k, v, 5), test_utils=checks)


def test_torch_compile_matches_eager(seed):
    """fullgraph=True: no graph break around the kernels; forward and gradients equal eager's."""
    q = make(1, 4, 24, 32, f32, "bthd")
    k, v = (make(1, 2, 24, 32, f32, "contiguous") for _ in range(2))
    g = torch.randn(1, 4, 24, 32, device=DEVICE)

    def step(fn):
        q.grad = k.grad = v.grad = None
        out = fn(q, k, v)
        out.backward(g)
        return [out.detach(), q.grad, k.grad, v.grad]

    def attend(q, k, v):
        return flash_attention(q * 0.5, k, v, window=7).relu()

    eager = step(attend)
    compiled = step(torch.compile(attend, fullgraph=True))
    for name, c, e in zip(("out", "dq", "dk", "dv"), compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_torch_compile_dynamic_shapes(seed):
    """dynamic=True (as eval_mmlu's compile): lengths and the window (= Tk when None) become symbolic ints."""
    compiled = torch.compile(lambda q, k, v: flash_attention(q, k, v), dynamic=True, fullgraph=True)
    for T in (17, 29):
        q, k, v = (make(1, 2, T, 16, f32, "contiguous") for _ in range(3))
        g = torch.randn(1, 2, T, 16, device=DEVICE)
        out = compiled(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), g)
        ref = flash_attention(q, k, v)
        for name, c, e in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *torch.autograd.grad(ref, (q, k, v), g))):
            torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6, msg=lambda m: f"T={T} {name}: {m}")


def naive_attention(q, k, v, window):
    """One query position at a time, straight from the definition: the reference's reference."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(Hq):
            kv = h // (Hq // Hkv)
            for r in range(Tq):
                i = r + Tk - Tq
                first = 0 if window is None else max(0, i - window + 1)
                keys = range(first, i + 1)
                scores = torch.stack([q[b, h, r] @ k[b, kv, j] / math.sqrt(D) for j in keys])
                weights = torch.exp(scores - scores.max())
                weights = weights / weights.sum()
                out[b, h, r] = sum(w * v[b, kv, j] for w, j in zip(weights, keys))
    return out


@pytest.mark.parametrize("Hq,Hkv,Tq,Tk,window", [(2, 2, 7, 7, None), (4, 2, 9, 9, 3), (3, 1, 4, 9, None),
                                                   (4, 1, 5, 11, 4), (2, 1, 6, 6, 1), (2, 2, 1, 5, 2)])
def test_reference_matches_naive_loop(seed, Hq, Hkv, Tq, Tk, window):
    q = torch.randn(2, Hq, Tq, 8, dtype=torch.float64)
    k, v = (torch.randn(2, Hkv, Tk, 8, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(attention_reference(q, k, v, window), naive_attention(q, k, v, window),
                               rtol=1e-12, atol=1e-12)


DECODE_CASES = [  # B, Hq, Hkv, Tk, D, window, dtype
    (1, 4, 1, 45, 32, None, f32),  # MQA, ragged
    (2, 6, 2, 37, 64, 16, bf16),  # 3 query heads per K/V head, window < Tk, batch 2
    (1, 2, 2, 50, 16, 100, f16),  # MHA, window > Tk
    (1, 32, 1, 70, 128, None, bf16),  # the 7B config's group: 32 query heads on one K/V head
    (1, 4, 2, 1, 32, None, f32),  # a cache of one position
    (1, 4, 4, 33, 32, 1, f32),  # window 1: the query sees only its own key
]


@pytest.mark.parametrize("sm_count", [1, 132])
@pytest.mark.parametrize("B,Hq,Hkv,Tk,D,window,dtype", DECODE_CASES)
def test_decode_matches_reference(seed, monkeypatch, sm_count, B, Hq, Hkv, Tk, D, window, dtype):
    """flash_decode over a cache as the model keeps it (a prefix view of a longer buffer), in one split (few SMs)
    and in many (the interpreter's 16-key splits), against the float64 reference at Tq = 1."""
    monkeypatch.setattr(attention, "_sm_count", lambda device: sm_count)
    k, v = (torch.randn(B, Hkv, Tk + 7, D, dtype=dtype, device=DEVICE)[:, :, :Tk] for _ in range(2))
    q = torch.randn(B, 1, Hq, D, dtype=dtype, device=DEVICE).transpose(1, 2)
    n_splits, _ = attention._decode_splits(B * Hkv, Tk if window is None else min(window, Tk), q.device)
    print(f"{n_splits} split(s)")
    with torch.no_grad():
        out = flash_decode(q, k, v, window)
    assert out.dtype == dtype and out.transpose(1, 2).is_contiguous()
    assert_close(out, attention_reference(q.double(), k.double(), v.double(), window), "out", dtype)


def test_decode_errors():
    q, k = torch.randn(1, 4, 2, 32, device=DEVICE), torch.randn(1, 2, 9, 32, device=DEVICE)
    with pytest.raises(ValueError, match="one query position"):
        flash_decode(q, k, k)
    with pytest.raises(ValueError, match="no backward"):
        flash_decode(q[:, :, :1].requires_grad_(), k, k)
    with pytest.raises(ValueError, match="not a multiple of the 2 K/V heads"):
        flash_decode(q[:, :3, :1], k, k)


def far_offsets_check():
    """q, k, v and dO of one head whose T = 40 rows lie 2^26 elements apart in one buffer, so the last rows start
    past 2^31 elements: the forward, both backward paths and the decode kernel, with TMA and with plain loads,
    against the float64 reference. Only the rows are touched: 5 GiB of address space, a few MB of memory."""
    T, D, stride = 40, 16, 2 ** 26
    buf = torch.empty(T * stride, dtype=bf16, device=DEVICE)
    q, k, v, g = (buf.as_strided((1, 1, T, D), (0, D, stride, 1), storage_offset=i * D) for i in range(4))
    for t in (q, k, v, g):
        t.copy_(torch.randn(1, 1, T, D))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, 9)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), g.double())
    for tma in (True, False):
        attention.TMA_LOADS = tma
        for deterministic in (True, False):
            out = flash_attention(q, k, v, 9, deterministic)
            assert_close(out, ref, "out", bf16)
            for name, x, r in zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), g), ref_grads):
                assert_close(x, r, name, bf16)
        with torch.no_grad():
            assert_close(flash_decode(q[:, :, -1:], k, v, 9), ref[:, :, -1:], "out", bf16)


def test_offsets_past_2_31_elements():
    """In a subprocess: a 32-bit row offset wraps and reads outside the buffer, which can crash the process."""
    env = {"TRITON_INTERPRET": "1"} if not CUDA else {}
    run = subprocess.run([sys.executable, "-c", "import test_attention_kernel as t; t.far_offsets_check()"],
                         cwd=f"{ROOT}/tests", env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"


def test_check_catches_wrong_masks_and_head_mapping(seed):
    """The tolerances are tight enough to catch a kernel that is one key off at a mask edge, aligns the diagonal to
    the wrong end, maps query heads to the wrong K/V head, scales wrongly, or drops query heads from dK's sum."""
    Hq, Hkv, Tq, Tk, W, dtype = 4, 2, 40, 48, 9, bf16
    q = make(1, Hq, Tq, 32, dtype, "contiguous")
    k, v = make(1, Hkv, Tk, 32, dtype, "contiguous"), make(1, Hkv, Tk, 32, dtype, "contiguous")
    out = flash_attention(q, k, v, W)
    q64, k64, v64 = (x.detach().double() for x in (q, k, v))
    q_per_kv = Hq // Hkv
    wrong = {
        "window one key wider": attention_reference(q64, k64, v64, W + 1),
        "window one key narrower": attention_reference(q64, k64, v64, W - 1),
        "no window": attention_reference(q64, k64, v64, None),
        "diagonal aligned to the start": attention_reference(q64, k64[:, :, :Tq], v64[:, :, :Tq], W),
        "query head h reads K/V head h % Hkv": attention_reference(q64, k64.repeat(1, q_per_kv, 1, 1),
                                                                   v64.repeat(1, q_per_kv, 1, 1), W),
        "scale 1/D instead of 1/sqrt(D)": attention_reference(q64 / math.sqrt(32), k64, v64, W),
    }
    right = attention_reference(q64, k64, v64, W)
    assert_close(out, right, "out", dtype)
    with pytest.raises(AssertionError):  # the kernel itself, asked for the wrong window
        assert_close(flash_attention(q, k, v, W + 1), right, "out", dtype)
    for bug, ref in wrong.items():
        with pytest.raises(AssertionError):
            assert_close(out, ref, "out", dtype)
        print(f"caught: {bug} (rel error {rel_errors(out, ref)[0]:.1e})")

    g = torch.randn_like(out)
    (dk,) = torch.autograd.grad(out, (k,), g)
    k64.requires_grad_()
    ref = attention_reference(q64, k64, v64, W)
    first_head_only = g.double().clone().view(1, Hkv, q_per_kv, Tq, 32)
    first_head_only[:, :, 1:] = 0  # dK from the first query head of each group alone
    (rk_partial,) = torch.autograd.grad(ref, (k64,), first_head_only.view_as(g))
    with pytest.raises(AssertionError):
        assert_close(dk, rk_partial, "dk", dtype)


@triton.jit
def _probe_ranges(Out, Tq, Tk, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KEYS: tl.constexpr):
    pid = tl.program_id(0)
    if KEYS:  # key-block stages of query block pid (forward, dQ)
        lo, a, b, hi = _key_ranges(pid * BLOCK_M, Tq, Tk - Tq, window, BLOCK_M, BLOCK_N)
    else:  # query-block stages of key block pid (dK/dV)
        lo, a, b, hi = _query_ranges(pid * BLOCK_N, Tq, Tk, Tk - Tq, window, BLOCK_M, BLOCK_N)
    tl.store(Out + pid * 4 + 0, lo)
    tl.store(Out + pid * 4 + 1, a)
    tl.store(Out + pid * 4 + 2, b)
    tl.store(Out + pid * 4 + 3, hi)


def _check_stages(visible, lo, a, b, hi, step, size, block, padded_ok):
    """visible: (positions of this block, all positions of the other axis). Stages [lo, a) [a, b) [b, hi) stepping
    by `step` along an axis of `size` positions must cover every visible pair, load no block without a visible pair
    at either end, need no mask in [a, b), and mask at most two block-widths' worth of blocks."""
    loaded = list(range(lo, hi, step))
    cols = visible.any(0).nonzero().flatten().tolist()
    if not cols:
        assert not loaded, "a block no position sees is loaded"
        return
    assert lo <= a <= b <= hi, (lo, a, b, hi)
    assert (a - lo) % step == 0 or a == hi, "stage 2 starts off the block grid"
    assert (b - a) % step == 0 or b == hi, "stage 3 starts off the block grid"
    assert loaded[0] <= cols[0] < loaded[0] + step, "the first loaded block holds no visible pair"
    assert hi == cols[-1] + 1, "the loop bound is not the last visible position"
    for start in range(a, b, step):
        # dK/dV may run an unmasked block into padding rows (they load q = dO = 0, lse = inf); forward/dQ may not
        assert padded_ok or start + step <= size, f"unmasked block {start} holds padded keys"
        assert visible[:, start:start + step].all(), f"unmasked block {start} needs a mask"
    n_masked = len(range(lo, a, step)) + len(range(b, hi, step))
    assert n_masked <= 2 * (triton.cdiv(block - 1, step) + 1), f"{n_masked} masked blocks"


@pytest.mark.parametrize("BLOCK_M,BLOCK_N", [(16, 16), (32, 16), (16, 32), (64, 16)])
def test_block_ranges_skip_exactly_the_invisible_blocks(BLOCK_M, BLOCK_N):
    """The loop bounds of all three kernels, exhaustively on small sizes, for block shapes beyond the interpreter's."""
    for Tq, Tk in [(1, 1), (37, 37), (64, 64), (100, 100), (20, 90), (1, 70), (67, 130)]:
        for window in sorted({1, 5, 16, 17, 40, 64, 95, Tk}):
            i = torch.arange(Tk - Tq, Tk)[:, None]
            j = torch.arange(Tk)[None, :]
            visible = (j <= i) & (j > i - window)  # (Tq, Tk)
            for keys, n_blocks in ((True, triton.cdiv(Tq, BLOCK_M)), (False, triton.cdiv(Tk, BLOCK_N))):
                out = torch.empty(n_blocks, 4, dtype=torch.int32, device=DEVICE)
                _probe_ranges[(n_blocks,)](out, Tq, Tk, window, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, KEYS=keys)
                for blk, (lo, a, b, hi) in enumerate(out.tolist()):
                    if keys:
                        rows = visible[blk * BLOCK_M:(blk + 1) * BLOCK_M]
                        _check_stages(rows, lo, a, b, hi, BLOCK_N, Tk, BLOCK_M, padded_ok=False)
                    else:
                        cols = visible[:, blk * BLOCK_N:(blk + 1) * BLOCK_N].T
                        _check_stages(cols, lo, a, b, hi, BLOCK_M, Tq, BLOCK_N, padded_ok=True)


def _t(*shape, dtype=f32, device=DEVICE):
    return torch.randn(*shape, dtype=dtype, device=device)


@pytest.mark.parametrize("args,match", [
    ((_t(1, 2, 8, 48), _t(1, 2, 8, 48), _t(1, 2, 8, 48)), "head dim 48 not supported"),
    ((_t(1, 2, 8, 256), _t(1, 2, 8, 256), _t(1, 2, 8, 256)), "head dim 256 not supported"),
    ((_t(1, 3, 8, 32), _t(1, 2, 8, 32), _t(1, 2, 8, 32)), "not a multiple of the 2 K/V heads"),
    ((_t(1, 2, 8, 32), _t(1, 2, 8, 32, dtype=bf16), _t(1, 2, 8, 32, dtype=bf16)), "different dtypes"),
    ((_t(1, 2, 8, 32), _t(1, 2, 8, 32, device="meta"), _t(1, 2, 8, 32, device="meta")), "different devices"),
    ((_t(2, 8, 32), _t(1, 2, 8, 32), _t(1, 2, 8, 32)), "q must be 4-D"),
    ((_t(1, 2, 8, 32), _t(2, 8, 32), _t(2, 8, 32)), "k must be 4-D"),
    ((_t(2, 2, 8, 32), _t(1, 2, 8, 32), _t(1, 2, 8, 32)), "batch size 2 but k/v have 1"),
    ((_t(1, 2, 9, 32), _t(1, 2, 8, 32), _t(1, 2, 8, 32)), "q has 9 positions but k/v only 8"),
    ((_t(1, 2, 8, 32), _t(1, 2, 8, 32), _t(1, 2, 7, 32)), "k and v must have the same shape"),
    ((_t(1, 2, 8, 32), _t(1, 2, 8, 64), _t(1, 2, 8, 64)), "head dim 32 but k/v have 64"),
    ((_t(1, 2, 8, 32, dtype=torch.float64),) * 3, "float64 not supported"),
])
def test_errors(args, match):
    with pytest.raises(ValueError, match=match):
        flash_attention(*args)


@pytest.mark.parametrize("window", [0, -3, 2.5])
def test_bad_window(window):
    q = _t(1, 2, 8, 32)
    with pytest.raises(ValueError, match="window must be None or an int >= 1"):
        flash_attention(q, q, q, window)
    with pytest.raises(ValueError, match="window must be None or an int >= 1"):
        attention_reference(q, q, q, window)


# ---- real sizes, on a GPU only --------------------------------------------------------------------------------------

def chunked_reference(q, k, v, window, chunk=1024):
    """fp32 attention_reference over query chunks, each against only the keys it can see, to fit T = 16k."""
    T, out = q.size(2), []
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        lo = 0 if window is None else max(0, s - window + 1)
        out.append(attention_reference(q[:, :, s:e].float(), k[:, :, lo:e].float(), v[:, :, lo:e].float(), window))
    return torch.cat(out, dim=2)


@pytest.mark.skipif(not CUDA, reason="real sizes need CUDA")
@pytest.mark.parametrize("B,Hq,Hkv,T,D,window", [(2, 16, 8, 2048, 128, None), (1, 16, 1, 4096, 128, 1024),
                                                 (1, 16, 8, 16384, 128, None), (1, 16, 2, 16384, 128, 1024),
                                                 (4, 32, 8, 4096, 64, None), (1, 16, 16, 3001, 128, 777)])
def test_forward_real_sizes_cuda(seed, B, Hq, Hkv, T, D, window):
    q, k, v = (make(B, H, T, D, bf16, "bthd") for H in (Hq, Hkv, Hkv))
    with torch.no_grad():
        assert_close(flash_attention(q, k, v, window), chunked_reference(q, k, v, window), "out", bf16)


@pytest.mark.skipif(not CUDA, reason="real sizes need CUDA")
@pytest.mark.parametrize("B,Hq,Hkv,T,D,window,dtype", [(1, 16, 8, 2048, 128, None, bf16),
                                                       (1, 16, 2, 4096, 128, 512, bf16),
                                                       (2, 8, 1, 1999, 64, None, f16),
                                                       (1, 4, 2, 1024, 128, 300, f32)])
def test_gradients_real_sizes_cuda(seed, B, Hq, Hkv, T, D, window, dtype):
    q, k, v = (make(B, H, T, D, dtype, "bthd") for H in (Hq, Hkv, Hkv))
    out = flash_attention(q, k, v, window)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = attention_reference(q32, k32, v32, window)
    assert_close(out, ref, "out", dtype)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    refs = torch.autograd.grad(ref, (q32, k32, v32), g.float())
    for name, x, r in zip(("dq", "dk", "dv"), grads, refs):
        assert_close(x, r, name, dtype)
