"""DDP and FSDP2 under torchrun (2 CPU processes, gloo) against one process; sharded checkpoints; the 7B dry run."""
import json
import os
import re
import shutil
from dataclasses import asdict

import pytest
import torch

from model import GPT, GPTConfig
from nanogpt.checkpoint import save_checkpoint, step_dirs
from tests.conftest import ROOT, TINY, run_script

MODEL = dict(n_layer=4, n_embd=32, n_head=4, n_kv_head=1, attn_pattern="LG", local_window=8, kv_share=2,
             share_global_kv=True, block_size=32, mlp="relu2")
SOCKET_TROUBLE = r"Address already in use|Connection (refused|reset)|EADDRINUSE|RendezvousConnectionError"
ARGS = [*TINY, *(f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}" for k, v in MODEL.items()),
        "--lr_decay_iters=12", "--dtype=float32", "--eval_interval=6"]  # later values override TINY's


@pytest.fixture(scope="module")
def setup(data_root, tmp_path_factory):
    """The prepared dataset and a shared initial checkpoint, so every run starts from identical weights."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=65, **MODEL)
    init = str(tmp_path_factory.mktemp("dist") / "init.pt")
    save_checkpoint({"model": GPT(cfg).state_dict(), "model_args": asdict(cfg)}, init)
    return data_root, init


def launch(nproc, *args, check=True):
    """train.py under torchrun with nproc processes (0: plain python)."""
    script = f"-m torch.distributed.run --standalone --nproc_per_node={nproc} train.py" if nproc else "train.py"
    for attempt in range(2):
        result = run_script(script, *args, env=dict(OMP_NUM_THREADS="1"), check=False)
        # a local port lost to another process is the machine's fault, not the code's: try once more
        if result.returncode == 0 or not re.search(SOCKET_TROUBLE, result.stderr):
            break
    if check and result.returncode != 0:
        rank_errors = "\n".join(line for line in result.stderr.splitlines() if line.startswith("[rank"))
        raise AssertionError(f"{script} {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{rank_errors[-4000:]}"
                             f"\n{result.stderr[-1500:]}")
    return result


def losses(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["iter"]: r["loss"] for r in rows if "loss" in r}


OPTIMIZERS = {"adamw": ["--optimizer=adamw"],
              "muon": ["--optimizer=muon", "--muon_normalize=True", "--muon_momentum_warmup=4", "--n_expert=4"]}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_ddp_and_fsdp_match_one_process(setup, tmp_path, optimizer):
    data, init = setup
    if optimizer == "muon":  # an MoE model of its own: Muon's stacked-expert path under FSDP too
        init = str(tmp_path / "init_moe.pt")
        cfg = GPTConfig(vocab_size=65, n_expert=4, **MODEL)
        save_checkpoint({"model": GPT(cfg).state_dict(), "model_args": asdict(cfg)}, init)
    common = ARGS + OPTIMIZERS[optimizer] + [f"--data_root={data}", f"--init_from={init}", "--max_iters=8"]
    single = launch(0, *common, "--batch_size=8", f"--out_dir={tmp_path / 'single'}")
    launch(2, *common, "--batch_size=4", f"--out_dir={tmp_path / 'ddp'}")
    launch(2, *common, "--batch_size=4", "--fsdp=True", f"--out_dir={tmp_path / 'fsdp'}")
    reference = losses(tmp_path / "single")
    assert len(reference) == 8, single.stdout
    for name in ("ddp", "fsdp"):
        other = losses(tmp_path / name)
        assert other.keys() == reference.keys()
        for it in reference:  # fp32; only the order of the gradient reduction differs
            assert abs(other[it] - reference[it]) < 1e-5 * reference[it], (name, it, other[it], reference[it])


def test_sharded_checkpoint_resume_on_2_and_1_processes(setup, tmp_path):
    """With Muon, whose optimizer also runs AdamW on the embedding, head and vectors: both kinds of state go through
    the sharded checkpoint (the AdamW-only run is the same code path; one CI-sized run covers both)."""
    data, init = setup
    common = ARGS + OPTIMIZERS["muon"][:3] + [f"--data_root={data}", "--fsdp=True",
                                                 "--activation_checkpoint=selective"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    launch(2, *common, "--batch_size=4", "--max_iters=12", f"--out_dir={straight}", f"--init_from={init}")
    launch(2, *common, "--batch_size=4", "--max_iters=6", f"--out_dir={split}", f"--init_from={init}")
    assert [os.path.basename(d) for d in step_dirs(split)] == ["step_000006"]
    shutil.copytree(split, tmp_path / "split1")
    # what a kill during the next save leaves behind: a temp folder with some shards and no meta.pt
    os.makedirs(split / "step_000009.tmp")
    open(split / "step_000009.tmp" / "__0_0.distcp", "wb").write(b"partial")
    result = launch(2, *common, "--batch_size=4", "--max_iters=12", f"--out_dir={split}", "--init_from=resume")
    assert "resumed from" in result.stdout and "step_000006" in result.stdout
    a, b = losses(straight), losses(split)
    assert {i: a[i] for i in range(7, 13)} == {i: b[i] for i in range(7, 13)}  # identical after the resume
    # a different world size: one process with the same global batch continues the same run
    launch(1, *common, "--batch_size=8", "--max_iters=12", f"--out_dir={tmp_path / 'split1'}", "--init_from=resume")
    c = losses(tmp_path / "split1")
    for i in range(7, 13):
        assert abs(c[i] - a[i]) < 1e-5 * a[i]
    # sample.py reads the sharded checkpoint directly
    run_script("sample.py", f"--out_dir={split}", "--max_new_tokens=20", "--num_samples=1", "--device=cpu")


def analytic_7b_params(V=50304, d=4096, L=32, H=32, hd=128, hidden=14336, pattern="LLLLLG", kv_share=2):
    kinds = [pattern[i % len(pattern)] for i in range(L)]
    runs, start = [], 0  # lengths of runs of adjacent local layers
    for i in range(1, L + 1):
        if i == L or kinds[i] != kinds[start]:
            if kinds[start] == "L":
                runs.append(i - start)
            start = i
    producers = sum(-(-n // kv_share) for n in runs) + 1  # local groups + one K/V shared by every global layer
    per_layer = 2 * d + 2 * d * H * hd + hd + 3 * d * hidden  # norms, q and o, q-norm, SwiGLU
    return 2 * V * d + d + L * per_layer + producers * (2 * d * hd + hd)  # embedding, head, final norm, K/V producers


def test_7b_dry_run_counts_and_memory(tmp_path):
    result = launch(0, os.path.join(ROOT, "config/train_7b.py"), "--dry_run=True", f"--data_root={tmp_path}")
    total = int(re.search(r"parameters: ([\d,]+) total", result.stdout).group(1).replace(",", ""))
    assert total == analytic_7b_params() and 6.5e9 < total < 7.5e9
    params_gib = float(re.search(r"params \(fp32\)\s+([\d.]+) GiB", result.stdout).group(1))
    assert params_gib == pytest.approx(4 * total / 2**30, abs=0.01)
    assert re.search(r"needs ([\d.]+)x less than GQA-8", result.stdout) and \
        float(re.search(r"needs ([\d.]+)x less than GQA-8", result.stdout).group(1)) > 50


def test_launch_that_cannot_fit_stops_with_advice(setup, tmp_path):
    data, _ = setup
    result = launch(0, *ARGS, f"--data_root={data}", "--batch_size=4", "--gpu_mem_gb=1.0", f"--out_dir={tmp_path}",
                    check=False)
    assert result.returncode != 0 and "DOES NOT FIT" in result.stdout
    assert "activation_checkpoint='full'" in result.stderr and not os.path.exists(tmp_path / "ckpt.pt")


def test_fp8_under_ddp_and_fsdp_matches_one_process(setup, tmp_path):
    data, init = setup
    common = ARGS + [f"--data_root={data}", f"--init_from={init}", "--max_iters=6", "--fp8=True",
                     "--fp8_recipe=blockwise", "--activation_checkpoint=full"]
    single = launch(0, *common, "--batch_size=8", f"--out_dir={tmp_path / 'single'}")
    assert "fp8: kept in higher precision" in single.stdout  # the 32 -> 8 K/V projections are too narrow
    launch(2, *common, "--batch_size=4", f"--out_dir={tmp_path / 'ddp'}")
    launch(2, *common, "--batch_size=4", "--fsdp=True", f"--out_dir={tmp_path / 'fsdp'}")
    a = losses(tmp_path / "single")
    for name in ("ddp", "fsdp"):
        b = losses(tmp_path / name)
        assert a.keys() == b.keys() and all(abs(a[i] - b[i]) < 1e-3 * a[i] for i in a), (name, a, b)
