"""Weight-only quantization (nanogpt/quant.py, nanokernels/quant_gemm.py, tools/quantize.py): the codes against a
hand-computed example and the half-step error bound, the Triton GEMM in the interpreter against float64 (decode and
prefill shapes, ragged N and K, fp32 / bf16 / fp16), quantized models equal to float models holding the dequantized
weights (dense, MoE, head), torchao's int8 weight-only as an independent reference, and the tool end to end with its
bad inputs (an already-quantized checkpoint, a group size that does not divide a width) in one line, and the batching
engine serving a quantized model."""
import copy
import os
from dataclasses import asdict

import pytest
import torch
from conftest import assert_one_clear_line, run_script

from model import GPT, GPTConfig
from nanogpt.checkpoint import load_model, read_checkpoint, save_checkpoint
from nanogpt.quant import QuantWeight, model_bytes, quantize_model, quantize_tensor
from nanokernels.quant_gemm import dequantize, pack_int4, quant_matmul_ref, quant_matmul_triton, unpack_int4

CHARS = "\n !:ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SPEC = {"kind": "char", "chars": CHARS}
DENSE = dict(block_size=32, vocab_size=len(CHARS), n_layer=2, n_embd=64, n_head=4, n_kv_head=2)
MOE = dict(DENSE, n_layer=3, n_expert=4, n_expert_active=2, moe_hidden=32, n_dense_layers=1, mlp="relu2")


def test_codes_of_a_hand_computed_int4_group_and_int8_row():
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    q, scale, zero = quantize_tensor(w, "int4", group_size=4)
    # range [-1, 2]: scale 3/15 = 0.2, zero round(1 / 0.2) = 5; 0.5 / 0.2 = 2.5 rounds to even 2, so code 7
    assert scale.item() == pytest.approx(0.2) and zero.tolist() == [[5]]
    assert unpack_int4(q).tolist() == [[0, 5, 7, 15]] and q.tolist() == [[0x50, 0xF7]]
    assert dequantize(q, scale, zero, 4, 4, torch.float64)[0].tolist() == pytest.approx([-1.0, 0.0, 0.4, 2.0])
    q, scale, _ = quantize_tensor(torch.tensor([[0.5, -1.27, 0.0]]), "int8")
    assert scale.item() == pytest.approx(0.01) and q.tolist() == [[50, -127, 0]]
    # a positive constant group: the range is widened to hold 0, so both 0 and the constant are exact
    q, scale, zero = quantize_tensor(torch.full((1, 4), 0.3), "int4", group_size=4)
    assert dequantize(q, scale, zero, 4, 4, torch.float64).tolist() == [[pytest.approx(0.3)] * 4]


@pytest.mark.parametrize("scheme, group", [("int8", 128), ("int4", 128), ("int4", 8)])
def test_every_weight_is_within_half_a_step_of_its_code(seed, scheme, group):
    w = torch.randn(3, 24, 256) * torch.rand(3, 24, 1) * 0.1      # a stack of experts, rows of different scales
    w[0, 0] = 0.0                                                     # an all-zero row
    w[1, 2, 5] = 3.0                                                  # an outlier
    w[2, 3, :group] = w[2, 3, :group].abs()                           # a group on one side of zero
    q, scale, zero = quantize_tensor(w, scheme, group)
    back = dequantize(q, scale, zero, 8 if scheme == "int8" else 4, group, torch.float64)
    step = scale.double()[..., None] if scheme == "int8" else scale.double().repeat_interleave(group, -1)
    assert ((back - w.double()).abs() <= step / 2 * (1 + 1e-6) + 1e-12).all()
    assert (back[0, 0] == 0).all()
    codes = torch.randint(0, 16, (5, 10), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)


def test_a_weight_with_nan_is_refused():
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_tensor(torch.tensor([[1.0, float("nan")]]), "int8")


# (M, N, K, group): M = 1 and 3 are decode steps; 40 a prefill; N and K off the tile sizes
GEMM_SHAPES = [(1, 40, 256, 128), (3, 33, 96, 32), (17, 20, 64, 16), (40, 70, 384, 128), (1, 7, 144, 16)]


@pytest.mark.parametrize("M, N, K, group", GEMM_SHAPES)
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_gemm_in_the_interpreter_against_float64(seed, M, N, K, group, scheme, dtype):
    bits = 8 if scheme == "int8" else 4
    qw = QuantWeight.from_float(torch.randn(N, K) * 0.05, scheme, group)
    x = torch.randn(M, K).to(dtype)
    want = x.double() @ dequantize(qw.qdata, qw.scale, qw.zero, bits, group, torch.float64).t()
    got = quant_matmul_triton(x, qw.qdata, qw.scale, qw.zero, bits, group)
    ref = quant_matmul_ref(x, qw.qdata, qw.scale, qw.zero, bits, group)
    assert got.dtype == dtype and got.shape == (M, N)
    # fp32: accumulation order only; bf16 / fp16: the output's own rounding (2^-9 / 2^-12 relative) on top
    rel = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-10}[dtype]
    bound = rel * want.abs() + 1e-5 * (x.double().abs() @ dequantize(qw.qdata, qw.scale, qw.zero, bits, group,
                                                                       torch.float64).abs().t())
    assert ((got.double() - want).abs() <= bound).all(), (got.double() - want).abs().max()
    assert ((ref.double() - want).abs() <= bound).all()


def test_the_kernel_refuses_a_group_it_does_not_take():
    qw = QuantWeight.from_float(torch.randn(4, 48), "int4", 24)
    with pytest.raises(ValueError, match="power-of-two groups"):
        quant_matmul_triton(torch.randn(1, 48), qw.qdata, qw.scale, qw.zero, 4, 24)


def dequantized_twin(model, qmodel, names):
    """A float64 copy of the float model holding the quantized model's dequantized weights."""
    twin = copy.deepcopy(model).double()
    for name in names:
        owner, param = name.rsplit(".", 1)
        getattr(twin.get_submodule(owner), param).data = getattr(qmodel.get_submodule(owner), param).double()
    return twin


@pytest.mark.parametrize("arch", [DENSE, MOE], ids=["dense", "moe"])
@pytest.mark.parametrize("scheme, group, head", [("int8", 128, True), ("int4", 32, False), ("int4", 16, True)])
def test_a_quantized_model_computes_the_float_model_of_its_dequantized_weights(seed, arch, scheme, group, head):
    model = GPT(GPTConfig(**arch)).eval()
    qmodel = copy.deepcopy(model)
    names = quantize_model(qmodel, scheme, group, head)
    assert ("lm_head.weight" in names) == head and not any("router" in n for n in names)
    assert len([n for n in names if ".w_up" in n or ".w_down" in n]) == (4 if arch is MOE else 0)
    assert not any(p.dim() >= 2 and n.startswith("blocks") and "router" not in n
                   for n, p in qmodel.named_parameters())  # every block GEMM weight is gone
    twin = dequantized_twin(model, qmodel, names)
    idx = torch.randint(0, len(CHARS), (2, 20))
    with torch.no_grad():
        got, want = qmodel.logits(qmodel(idx)), twin.logits(twin(idx))
        loss, want_loss = qmodel(idx, targets=idx)[0], twin(idx, targets=idx)[0]
    assert torch.allclose(got.double(), want, atol=1e-4, rtol=1e-4)
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-5)
    assert model_bytes(qmodel) < model_bytes(model) * (0.5 if scheme == "int8" else 0.4)


def test_the_model_runs_through_the_triton_kernel_in_the_interpreter(seed, monkeypatch):
    import nanogpt.quant
    model = GPT(GPTConfig(**MOE)).eval()
    quantize_model(model, "int4", 16, head=True)
    idx = torch.randint(0, len(CHARS), (1, 9))
    with torch.no_grad():
        want = model.logits(model(idx))
        monkeypatch.setattr(nanogpt.quant, "quant_matmul", quant_matmul_triton)
        got = model.logits(model(idx))  # empty expert slices included
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_int8_matches_torchao_int8_weight_only_within_a_step(seed):
    """torchao's Int8WeightOnlyConfig, an independent implementation of the same scheme: symmetric, per output
    channel (its scale is max|w| / 127.5 with codes in [-128, 127], ours max|w| / 127 in [-127, 127])."""
    torchao = pytest.importorskip("torchao.quantization")
    model = GPT(GPTConfig(**DENSE)).eval()
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    names = quantize_model(ours, "int8")
    torchao.quantize_(theirs.blocks, torchao.Int8WeightOnlyConfig())
    for name in names:
        owner, _ = name.rsplit(".", 1)
        mine, ao = ours.get_submodule(owner).weight, theirs.get_submodule(owner).weight.dequantize()
        step = model.get_submodule(owner).weight.abs().amax(1, keepdim=True) / 127
        assert ((mine - ao).abs() <= step * (1 + 1e-5)).all(), name  # both within half a step of the weight
    idx = torch.randint(0, len(CHARS), (2, 20))
    with torch.no_grad():
        float_loss, our_loss, ao_loss = (m(idx, targets=idx)[0].item() for m in (model, ours, theirs))
    assert abs(our_loss - float_loss) < 0.01 * abs(float_loss) and abs(ao_loss - float_loss) < 0.01 * abs(float_loss)
    assert abs(our_loss - ao_loss) < 0.005 * abs(float_loss)


def save_run(path, model):
    os.makedirs(path)
    save_checkpoint({"model": model.state_dict(), "model_args": asdict(model.config), "tokenizer": SPEC,
                     "optimizer": {"state": {}}, "iter_num": 7}, os.path.join(path, "ckpt.pt"))
    return str(path)


def test_the_tool_writes_a_checkpoint_inference_loads_and_refuses_bad_input_in_one_line(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**DENSE)).eval()
    src, dst = save_run(tmp_path / "run", model), str(tmp_path / "run-int4")
    result = run_script("tools/quantize.py", f"--model={src}", f"--out_dir={dst}", "--scheme=int4", "--group_size=32",
                        "--head=True")
    assert "weights quantized to int4" in result.stdout
    loaded, tok, ckpt = load_model(dst)
    assert ckpt["quantization"]["scheme"] == "int4" and "optimizer" not in ckpt and ckpt["iter_num"] == 7
    assert os.path.getsize(os.path.join(dst, "ckpt.pt")) < 0.35 * os.path.getsize(os.path.join(src, "ckpt.pt"))
    expected = copy.deepcopy(model)
    quantize_model(expected, "int4", 32, head=True)
    idx = torch.tensor([tok.encode("ROMEO:")])
    with torch.no_grad():
        assert torch.equal(loaded.logits(loaded(idx)), expected.logits(expected(idx)))
    # sample.py loads it like any checkpoint
    sampled = run_script("sample.py", f"--out_dir={dst}", "--device=cpu", "--num_samples=1", "--max_new_tokens=5",
                         "--start=ROMEO:", "--temperature=0")
    assert sampled.stdout.startswith("ROMEO:")
    # only inference loads it: training, merging and export read the float checkpoint
    with pytest.raises(ValueError, match="holds int4 weights quantized for inference: train, merge or export the "
                                         "float checkpoint"):
        read_checkpoint(dst)
    assert_one_clear_line(run_script("tools/merge.py", f"--models={dst},{src}", f"--out_dir={tmp_path / 'm'}",
                                     check=False), "quantized for inference")
    assert_one_clear_line(run_script("tools/quantize.py", f"--model={dst}", f"--out_dir={tmp_path / 'again'}",
                                     check=False), "already quantized (int4)", "unquantized checkpoint")
    assert_one_clear_line(run_script("tools/quantize.py", f"--model={src}", f"--out_dir={tmp_path / 'g'}",
                                     "--scheme=int4", "--group_size=48", check=False),
                          "group_size 48 does not divide", "width 64", "--group_size=64")



def test_the_batching_engine_serves_a_quantized_model_as_it_generates_alone(seed):
    from nanogpt.engine import Engine
    from nanogpt.sampling import SamplingParams
    model = GPT(GPTConfig(**dict(MOE, attn_pattern="LG", local_window=8))).eval()
    quantize_model(model, "int4", 16, head=True)
    prompts, greedy = [[1, 2, 3], [4, 5, 6, 7, 8], [9]], SamplingParams(temperature=0, max_tokens=10)
    batched = Engine(model, slots=2, prefill_chunk=2).run([(p, greedy) for p in prompts])
    alone = [model.generate(torch.tensor([p]), 10)[0, len(p):].tolist() for p in prompts]
    assert batched == alone
