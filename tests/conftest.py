"""Shared test setup: Triton kernels run in the interpreter when there is no GPU; the repo is importable; one
subprocess runner, one set of tiny-model arguments, one replayable seed, and the prepared tiny-Shakespeare data."""
import os
import random
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
TIKTOKEN_CACHE = os.path.join(SHARED, "tiktoken_cache")
if os.path.isdir(TIKTOKEN_CACHE):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", TIKTOKEN_CACHE)  # GPT-2 BPE offline (subprocesses inherit it)

# A model small enough that train.py runs a step in milliseconds on the CPU.
TINY = ["--n_layer=2", "--n_embd=32", "--n_head=2", "--block_size=32", "--batch_size=4", "--eval_iters=2",
        "--log_interval=1", "--warmup_iters=2", "--lr_decay_iters=16", "--compile=False", "--device=cpu"]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes on a cold cache (deselect locally with -m 'not slow')")


def run_script(script, *args, env=None, check=True, timeout=600):
    """Run a repo script (or `-m module` when script starts with '-m ') in a subprocess from the repo root."""
    module_run = script.startswith("-m ")
    cmd = [sys.executable, *script.split()] if module_run else [sys.executable, os.path.join(ROOT, script)]
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}  # None unsets a variable
    result = subprocess.run(cmd + [str(a) for a in args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed (exit {result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def assert_one_clear_line(result, *needles):
    """Exit status non-zero, no traceback, and the message (the last stderr line) names what to change."""
    err = result.stderr.strip()
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.splitlines()[-1] if err else ""
    for needle in needles:
        assert needle in last, f"{needle!r} not in {last!r}"


@pytest.fixture
def seed():
    """A fresh seed per test, printed (pytest shows it for a failing test); replay with TEST_SEED=<seed>."""
    s = int(os.environ.get("TEST_SEED") or random.SystemRandom().randrange(2**31))
    print(f"seed {s} (replay with TEST_SEED={s})")
    torch.manual_seed(s)
    random.seed(s)
    return s


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """A data root with tiny Shakespeare prepared at character level (from ../shared), once per test session."""
    root = tmp_path_factory.mktemp("data")
    subprocess.run([sys.executable, os.path.join(ROOT, "data/shakespeare_char/prepare.py"),
                    "--out_dir", str(root / "shakespeare_char"),
                    "--input", os.path.join(SHARED, "data/tinyshakespeare/input.txt")], check=True)
    return str(root)
