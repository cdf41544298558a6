"""fp8 training parity: a tiny model trained a few hundred steps with fp8=True (emulated on the CPU, with the same
rounding as the GPU kernels) ends within 2% of the same run in fp32."""
import os
import random

import pytest
import torch

from model import GPT, GPTConfig
from nanogpt.loader import BatchLoader
from nanogpt.optim import build_optimizer

STEPS = 200
SEED = random.SystemRandom().randrange(2**31)


@pytest.fixture(scope="module")
def data_dir(data_root):
    return os.path.join(data_root, "shakespeare_char")


def train(data_dir, recipe, seed):
    """Validation loss after STEPS steps of a tiny MoE model, in fp32 or with the given fp8 recipe."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=64, vocab_size=65, n_layer=2, n_embd=64, n_head=4, n_kv_head=1, mlp="relu2",
                          n_expert=4, n_expert_active=2, moe_hidden=64))
    if recipe:
        assert model.convert_fp8(recipe) == []
    optimizer = build_optimizer("adamw", model, 3e-3, 0.1, (0.9, 0.95), {}, "cpu")
    loader = BatchLoader([data_dir], "train", 16, 64, seed=seed)
    for _ in range(STEPS):
        x, y = loader.next_batch()
        ce, balance = model(x, y)
        (ce / (y >= 0).sum() + balance).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_expert_biases(model.expert_loads())
    model.eval()
    val = BatchLoader([data_dir], "val", 32, 64, seed=0)
    with torch.no_grad():
        return sum(model(*val.next_batch())[0].item() / (32 * 64) for _ in range(8)) / 8


@pytest.fixture(scope="module")
def reference(data_dir):
    print(f"seed {SEED}")
    return train(data_dir, None, SEED)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "blockwise"])
def test_fp8_training_ends_within_2_percent_of_fp32(data_dir, reference, recipe):
    fp8 = train(data_dir, recipe, SEED)
    print(f"seed {SEED}: val loss after {STEPS} steps: fp32 {reference:.4f}, fp8 {recipe} {fp8:.4f} "
          f"({100 * (fp8 - reference) / reference:+.2f}%)")
    assert reference < 2.6  # it learned something: a uniform guess is ln(65) = 4.17
    assert abs(fp8 - reference) < 0.02 * reference
