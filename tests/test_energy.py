"""nanogpt/energy.py: the sampler against a known power trace, RAPL counters on a fake sysfs tree (wraparound included),
nvidia-smi parsing, the sum over two gloo processes, and the kWh / CO2e / projection arithmetic."""
import json
import os
import random
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanogpt import energy, metrics
from nanogpt.checkpoint import read_checkpoint_file
from nanogpt.parallel import sum_over_ranks
from tests.conftest import TINY, run_script


class Trace:
    """A piecewise-constant power trace in real time, recording when it was read."""

    def __init__(self, segments):
        self.segments, self.start, self.reads = segments, time.monotonic(), []  # [(seconds, watts)]

    def watts_at(self, t):
        elapsed = t - self.start
        for seconds, watts in self.segments:
            if elapsed < seconds:
                return watts
            elapsed -= seconds
        return self.segments[-1][1]

    def __call__(self):
        now = time.monotonic()
        self.reads.append(now)
        return self.watts_at(now)

    def integral(self, t0, t1):
        """The exact energy between two times: the trace is constant between its change points."""
        edges, t = [t0, t1], self.start
        for seconds, _ in self.segments:
            t += seconds
            if t0 < t < t1:
                edges.append(t)
        edges.sort()
        return sum(self.watts_at((a + b) / 2) * (b - a) for a, b in zip(edges, edges[1:]))


def test_meter_integrates_a_known_trace(seed):
    segments = [(random.uniform(0.08, 0.15), random.uniform(10, 500)) for _ in range(5)]
    trace = Trace(segments)
    start = random.uniform(0, 1000)
    meter = energy.Meter(energy.IntegratedPower("fake", trace), start_joules=start, interval=0.005)
    time.sleep(sum(s for s, _ in segments) + 0.05)
    total = meter.stop()
    reads = trace.reads
    gaps = [b - a for a, b in zip(reads, reads[1:])]
    # the trapezoid rule is exact between change points and off by at most |jump| x gap / 2 across one
    bound = sum(abs(b[1] - a[1]) for a, b in zip(segments, segments[1:])) * max(gaps) / 2
    expected = start + trace.integral(reads[0], reads[-1])
    assert len(reads) > 20 and bound < 0.1 * (expected - start)  # the thread sampled: the bound is tight
    assert abs(total - expected) <= bound + 1e-9


def write_zone(folder, name, energy_uj, max_uj=None):
    os.makedirs(folder, exist_ok=True)
    for file, value in (("name", name), ("energy_uj", energy_uj), ("max_energy_range_uj", max_uj)):
        if value is not None:
            with open(os.path.join(folder, file), "w") as f:
                f.write(f"{value}\n")


def test_rapl_counters_wrap_and_count_packages_only(tmp_path, seed):
    limits = [random.randrange(10**6, 10**9), 2**32]
    before = [limits[0] - random.randrange(1, 1000), random.randrange(0, 10**6)]
    steps = [random.randrange(1000, 10**6), random.randrange(0, 10**8)]  # the first wraps past its limit
    for i in range(2):
        write_zone(tmp_path / f"intel-rapl:{i}", f"package-{i}", before[i], limits[i])
    write_zone(tmp_path / "intel-rapl:0:0", "core", 123, 2**32)          # inside package 0: not added again
    write_zone(tmp_path / "intel-rapl:2", "psys", 456, 2**32)            # the whole platform: includes packages
    write_zone(tmp_path / "intel-rapl-mmio:0", "package-0", 789, 2**32)  # the same package through MMIO
    source = energy.power_source("cpu", powercap=str(tmp_path))
    assert isinstance(source, energy.RaplCounters) and len(source.zones) == 2
    after = [(b + s) % limit for b, s, limit in zip(before, steps, limits)]
    assert after[0] < before[0]
    for i in range(2):
        write_zone(tmp_path / f"intel-rapl:{i}", f"package-{i}", after[i])
    assert source.joules_since_last(time.monotonic()) == sum(steps) / 1e6
    os.remove(tmp_path / "intel-rapl:1" / "energy_uj")  # unreadable (not root): the estimate takes over
    fallback = energy.power_source("cpu", power_estimate_w=42.0, powercap=str(tmp_path))
    assert fallback.label == "estimated, 42 W"
    assert fallback.joules_since_last(fallback.last_time + 2.0) == pytest.approx(84.0)


def test_nvidia_smi_readings_are_summed(tmp_path, monkeypatch, seed):
    readings = [round(random.uniform(50, 700), 2) for _ in range(random.randint(1, 8))]
    script = tmp_path / "nvidia-smi"
    script.write_text("#!/bin/sh\nprintf '" + "\\n".join(map(str, readings)) + "\\n'\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(energy, "nvml_watts", lambda: None)  # as on a machine without the NVML library
    source = energy.power_source("cuda")
    assert source.label == "nvidia-smi (GPUs)" and source.read_watts() == pytest.approx(sum(readings))


def rank_worker(rank, store, watts, results):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    source = energy.power_source("cpu", local_rank=rank, power_estimate_w=watts, powercap=results)
    measured = source.joules_since_last(source.last_time + 3.0)  # rank 0: 3 s at `watts`; rank 1 counts none
    total = sum_over_ranks(torch.tensor(measured + 10.0 * (rank + 1), dtype=torch.float64)).item()
    with open(os.path.join(results, f"rank{rank}"), "w") as f:
        json.dump([measured, total], f)
    dist.barrier()
    dist.destroy_process_group()


def test_sum_over_two_ranks(tmp_path, seed):
    watts = random.uniform(1, 1000)
    mp.spawn(rank_worker, args=(str(tmp_path / "store"), watts, str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}").read_text()) for r in range(2)]
    assert results[0][0] == pytest.approx(3 * watts) and results[1][0] == 0.0
    assert results[0][1] == results[1][1] == pytest.approx(3 * watts + 30.0)


def test_co2_and_projection_arithmetic(seed):
    joules, pue, g = random.uniform(1e5, 1e9), random.uniform(1.0, 2.0), random.uniform(10, 900)
    assert energy.co2_kg(joules, pue, g) == pytest.approx(joules / 3.6e6 * pue * g / 1000)
    n_gpus, mfu, hours = random.randint(1, 64), random.uniform(0.1, 0.6), random.uniform(1, 1000)
    flops = hours * 3600 * n_gpus * 989e12 * mfu  # an H100 (989 TFLOP/s, 700 W) for `hours`
    h, kwh, kg = energy.projection(flops, n_gpus, 989e12, mfu, 700, pue, g)
    assert h == pytest.approx(hours) and kwh == pytest.approx(hours * n_gpus * 0.7)
    assert kg == pytest.approx(kwh * pue * g / 1000)
    line = energy.describe_projection(flops, n_gpus, "H100", mfu, pue, g)
    assert f"{kwh:,.1f} kWh" in line and f"{n_gpus} x H100" in line
    with pytest.raises(ValueError, match="unknown GPU"):
        energy.describe_projection(flops, 1, "Z9000", mfu)


def test_training_reports_energy_and_a_resume_continues_it(tmp_path, data_root):
    out = str(tmp_path / "out")
    common = [*TINY, f"--data_root={data_root}", "--eval_interval=4", f"--out_dir={out}", "--power_estimate_w=100"]
    first = run_script("train.py", *common, "--max_iters=4")
    saved = read_checkpoint_file(os.path.join(out, "ckpt.pt"))["energy_joules"]
    run_script("train.py", *common, "--max_iters=8", "--init_from=resume")
    evals = [r for r in metrics.read(out) if "val_loss" in r]
    assert first.stdout.splitlines()[-1].startswith("final val loss") and "kg CO2e (" in first.stdout.splitlines()[-1]
    assert [r["iter"] for r in evals] == [0, 4, 8]
    assert evals[-1]["energy_kwh"] > energy.kwh(saved) > evals[0]["energy_kwh"]
