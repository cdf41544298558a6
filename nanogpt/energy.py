"""Energy and CO2e of a training run: power measured where the machine lets us, integrated over time in a background
thread, summed over nodes, and turned into kWh x PUE x grid carbon intensity = kg CO2e.

    meter = energy.Meter(energy.power_source(device_type, local_rank, power_estimate_w), start_joules=resumed)
    joules = parallel.sum_over_ranks(torch.tensor(meter.joules(), dtype=torch.float64)).item()  # every rank calls it
    print(energy.describe(joules, meter.source.label, pue, carbon_intensity_g_per_kwh))

Where power comes from, the first that works on this node:
  - NVIDIA GPUs: NVML (the nvidia-ml-py package), else `nvidia-smi`: the power draw of every GPU of the node,
    sampled each second and integrated with the trapezoid rule;
  - CPUs: the RAPL energy counters of each CPU package (/sys/class/powercap/intel-rapl:N, Intel and AMD; root
    only on kernels since 5.10), wraparound at max_energy_range_uj handled;
  - else an estimate, labelled "estimated": power_estimate_w, or the GPUs' TDP (table below), or 3.75 W per CPU
    core (AMD EPYC 9654: 360 W TDP over 96 cores).
Only local rank 0 measures (a node's GPUs are all read there); the other ranks count zero, so the sum over ranks
is the sum over nodes. RAPL counts the CPU packages (cores, caches, memory controller), not DRAM or the rest of
the machine; NVML counts the GPU boards, not the host: the PUE covers the building, not these.
"""
import glob
import os
import shutil
import subprocess
import threading
import time

# Average annual PUE that operators reported for their largest data center: Uptime Institute Global Data Center
# Survey 2024 (1.58 in 2023; about flat since 2020).
DEFAULT_PUE = 1.56
# US utility-scale generation in 2023: 1,532 million t CO2 for 4,183 TWh = 366 g/kWh (EIA, "How much carbon
# dioxide is produced per kilowatthour of U.S. electricity generation?", 0.81 lb/kWh). CO2 only.
DEFAULT_G_PER_KWH = 366.0
# Board power limits (TDP), watts, from NVIDIA's data sheets (SXM parts where there are several)
GPU_TDP_W = {"H100": 700, "H200": 700, "H800": 700, "B200": 1000, "A100": 400, "A10G": 150, "L4": 72, "4090": 450}
UNKNOWN_GPU_W = 700          # a GPU not in the table is assumed to draw what an H100 does
CPU_W_PER_CORE = 3.75        # AMD EPYC 9654 (this project's Zen 4 family): 360 W TDP / 96 cores
SAMPLE_SECONDS = 1.0


# ---------------------------------------------------------------------------------------------------- sources

class IntegratedPower:
    """A power reading in watts (all devices of the node together) integrated over time with the trapezoid rule."""

    def __init__(self, label, read_watts):
        self.label, self.read_watts = label, read_watts
        self.last_time, self.last_watts = time.monotonic(), read_watts()

    def joules_since_last(self, now):
        watts = self.read_watts()
        joules = (watts + self.last_watts) / 2 * (now - self.last_time)
        self.last_time, self.last_watts = now, watts
        return joules


class RaplCounters:
    """RAPL package energy counters (microjoules, wrapping to 0 at max_energy_range_uj), summed over packages."""

    label = "RAPL (CPU packages)"

    def __init__(self, zones):
        self.zones = zones  # [(energy_uj path, max_energy_range_uj)]
        self.last = [read_int(path) for path, _ in zones]

    def joules_since_last(self, now):
        values = [read_int(path) for path, _ in self.zones]
        # at most one wrap between two samples: a range (often 262 kJ) takes minutes to wrap at a package's power
        delta = sum((v - last) % limit for v, last, (_, limit) in zip(values, self.last, self.zones))
        self.last = values
        return delta / 1e6


def read_int(path):
    with open(path) as f:
        return int(f.read())


def rapl_zones(root="/sys/class/powercap"):
    """The readable package zones: intel-rapl:N folders named package-N (not their core/uncore/dram subzones,
    not psys, which already includes the packages, nor the intel-rapl-mmio copies of the same counters)."""
    zones = []
    for folder in sorted(glob.glob(os.path.join(root, "intel-rapl:*"))):
        if ":" in os.path.basename(folder).split(":", 1)[1]:
            continue  # a subzone, counted inside its package
        try:
            with open(os.path.join(folder, "name")) as f:
                if not f.read().startswith("package"):
                    continue
            read_int(os.path.join(folder, "energy_uj"))
            zones.append((os.path.join(folder, "energy_uj"), read_int(os.path.join(folder, "max_energy_range_uj"))))
        except (OSError, ValueError):  # unreadable (not root on a recent kernel): no RAPL here
            return []
    return zones


def nvml_watts():
    """A function giving the power of every GPU of the node in watts through NVML, or None without it."""
    try:
        import pynvml
        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        if not handles:
            return None
        read = lambda: sum(pynvml.nvmlDeviceGetPowerUsage(h) for h in handles) / 1000.0  # milliwatts
        read()
        return read
    except Exception:  # no package, no driver, or a GPU without power readings
        return None


def nvidia_smi_watts():
    """The same through the nvidia-smi command (slower: a process per sample), or None without it."""
    if shutil.which("nvidia-smi") is None:
        return None
    command = ["nvidia-smi", "--query-gpu=power.draw", "--format=csv,noheader,nounits"]
    read = lambda: sum(float(x) for x in subprocess.run(command, capture_output=True, text=True, timeout=10,
                                                        check=True).stdout.split())
    try:
        read()
        return read
    except (OSError, subprocess.SubprocessError, ValueError):  # '[N/A]' readings or a driver error
        return None


def estimated_watts(device_type, power_estimate_w):
    """The node's assumed power: the setting, else each GPU's TDP, else watts per CPU core."""
    if power_estimate_w:
        return power_estimate_w
    if device_type == "cuda":
        import torch
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return sum(next((w for k, w in GPU_TDP_W.items() if k in name), UNKNOWN_GPU_W) for name in names)
    return CPU_W_PER_CORE * len(os.sched_getaffinity(0))


def power_source(device_type, local_rank=0, power_estimate_w=0.0, powercap="/sys/class/powercap"):
    """What this process measures: GPUs on CUDA, CPU packages elsewhere, else an estimate; zero on every rank but
    each node's local rank 0."""
    if local_rank != 0:
        return IntegratedPower("counted by local rank 0", lambda: 0.0)
    if device_type == "cuda":
        for label, find in (("NVML", nvml_watts), ("nvidia-smi", nvidia_smi_watts)):
            read = find()
            if read is not None:
                return IntegratedPower(f"{label} (GPUs)", read)
    else:
        zones = rapl_zones(powercap)
        if zones:
            return RaplCounters(zones)
    watts = estimated_watts(device_type, power_estimate_w)
    return IntegratedPower(f"estimated, {watts:g} W", lambda: watts)


# ------------------------------------------------------------------------------------------------------- meter

class Meter:
    """Samples a source every `interval` seconds in a daemon thread; joules() is the total so far (start_joules,
    e.g. a resumed run's earlier total, plus what was measured since)."""

    def __init__(self, source, start_joules=0.0, interval=SAMPLE_SECONDS):
        self.source, self.total, self.interval = source, float(start_joules), interval
        self.lock, self.stopped = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True, name="energy-meter")
        self.thread.start()

    def sample(self):
        with self.lock:
            self.total += self.source.joules_since_last(time.monotonic())
            return self.total

    def run(self):
        while not self.stopped.wait(self.interval):
            try:
                self.sample()
            except Exception:  # a reading that fails once (driver hiccup): the next sample covers the interval
                pass

    def joules(self):
        """The total up to now (takes a fresh sample)."""
        return self.sample()

    def stop(self):
        self.stopped.set()
        self.thread.join()
        return self.sample()


# ------------------------------------------------------------------------------------------------- kWh and CO2e


def kwh(joules):
    return joules / 3.6e6


def co2_kg(joules, pue=DEFAULT_PUE, g_per_kwh=DEFAULT_G_PER_KWH):
    """kg CO2e of `joules` drawn by the machines: kWh x PUE (the building's overhead) x grid intensity."""
    return kwh(joules) * pue * g_per_kwh / 1000


def describe(joules, label, pue=DEFAULT_PUE, g_per_kwh=DEFAULT_G_PER_KWH):
    """'0.0123 kWh, 0.0070 kg CO2e (RAPL (CPU packages))' for a log line."""
    return f"{kwh(joules):.4g} kWh, {co2_kg(joules, pue, g_per_kwh):.4g} kg CO2e ({label})"


def projection(total_flops, n_gpus, peak_flops, mfu, watts_per_gpu, pue=DEFAULT_PUE, g_per_kwh=DEFAULT_G_PER_KWH):
    """(hours, kWh, kg CO2e) of a run of total_flops on n_gpus GPUs of peak_flops each at utilisation mfu, each
    drawing watts_per_gpu the whole time (its TDP: an upper estimate of the GPUs alone)."""
    seconds = total_flops / (n_gpus * peak_flops * mfu)
    joules = seconds * n_gpus * watts_per_gpu
    return seconds / 3600, kwh(joules), co2_kg(joules, pue, g_per_kwh)


def gpu_named(name):
    """(peak bf16 FLOP/s, TDP W) of a GPU name from nanogpt/runtime.py's and this module's tables."""
    from nanogpt.runtime import PEAK_BF16_FLOPS
    key = next((k for k in PEAK_BF16_FLOPS if k in name), None)
    if key is None or key not in GPU_TDP_W:
        known = sorted(set(PEAK_BF16_FLOPS) & set(GPU_TDP_W))
        raise ValueError(f"unknown GPU {name!r} for the projection: one of {', '.join(known)}")
    return PEAK_BF16_FLOPS[key], GPU_TDP_W[key]


def describe_projection(total_flops, n_gpus, gpu, mfu, pue=DEFAULT_PUE, g_per_kwh=DEFAULT_G_PER_KWH):
    """The dry run's line: the whole configured run's time, energy and CO2e on n_gpus of `gpu` at `mfu`."""
    peak, watts = gpu_named(gpu)
    hours, energy_kwh, kg = projection(total_flops, n_gpus, peak, mfu, watts, pue, g_per_kwh)
    return (f"projected: {total_flops:.3g} FLOPs on {n_gpus} x {gpu} ({peak / 1e12:g} TFLOP/s, {watts} W) at "
            f"{mfu:.0%} MFU: {hours:,.1f} h, {energy_kwh:,.1f} kWh, {kg:,.1f} kg CO2e "
            f"(PUE {pue}, {g_per_kwh:g} g/kWh)")
