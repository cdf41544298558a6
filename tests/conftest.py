"""Shared test setup: run Triton kernels in the interpreter when there is no GPU, and make the repo importable."""
import os
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


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """A data root with tiny Shakespeare prepared at character level (from ../shared), once per test session."""
    root = tmp_path_factory.mktemp("data")
    subprocess.run([sys.executable, os.path.join(ROOT, "data/shakespeare_char/prepare.py"),
                    "--out_dir", str(root / "shakespeare_char"),
                    "--input", os.path.join(SHARED, "data/tinyshakespeare/input.txt")], check=True)
    return str(root)
