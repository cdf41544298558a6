"""What the interpretability hook points (model.py's `hook` attributes, None unless nanogpt/interp.py installs them)
cost a training step: the quick run's model (4 layers, 128 wide, relu2, batch 32 x 128), forward + backward.

    git show BASE:model.py > /tmp/model_base.py
    python bench/hook_overhead.py --base=/tmp/model_base.py --steps=40     # paired timing, interleaved steps
    python bench/hook_overhead.py --base=/tmp/model_base.py --count=True   # Python bytecodes per step, exact

Paired: both models (the same weights) alternate step by step in one process, one thread, so a busy machine slows
both alike; the medians and their ratio are printed. --count: the Python bytecode instructions executed in model.py's
own code during one forward + backward, counted with an opcode trace (exact, free of timing noise: both models make
the same torch calls, so what the hooks add is Python work in model.py). --only=this|base runs one model.
"""
import importlib.util
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import configure

base = ""                      # the model.py to compare with (e.g. git show BASE:model.py > FILE)
steps = 40                     # timed steps per model
only = ""                      # 'this' or 'base': run one model only
count = False                  # count model.py's bytecodes per step instead of timing
batch_size = 32
block_size = 128


def load_model_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quick_run_model(module):
    torch.manual_seed(0)
    return module.GPT(module.GPTConfig(block_size=block_size, vocab_size=65, n_layer=4, n_embd=128, n_head=4,
                                       mlp="relu2"))


def step(model, x, y):
    loss, _ = model(x, y)
    loss.backward()


def bytecodes_per_step(model, path, x, y):
    """Python bytecode instructions executed in the file `path` during one step (sys.settrace, opcode events)."""
    executed = 0

    def trace(frame, event, arg):
        nonlocal executed
        if frame.f_code.co_filename != path:
            return None
        frame.f_trace_opcodes = True
        if event == "opcode":
            executed += 1
        return trace
    sys.settrace(trace)
    try:
        step(model, x, y)
    finally:
        sys.settrace(None)
    return executed


def main():
    configure(globals())
    torch.set_num_threads(1)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = {"this": os.path.join(root, "model.py"), "base": base}
    names = [only] if only else ["this", "base"]
    models = {n: quick_run_model(load_model_module(paths[n], f"model_{n}")) for n in names}
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, 65, (batch_size, block_size), generator=g) for _ in range(2))
    if count:
        for n in names:
            step(models[n], x, y)  # warm-up
            print(f"{n}: {bytecodes_per_step(models[n], paths[n], x, y):,} bytecodes in {os.path.basename(paths[n])}"
                  " per forward + backward")
        return
    times = {n: [] for n in names}
    for i in range(steps + 3):  # 3 warm-up steps each
        for n in names:
            t0 = time.perf_counter()
            step(models[n], x, y)
            if i >= 3:
                times[n].append(time.perf_counter() - t0)
    for n in names:
        print(f"{n}: median {statistics.median(times[n]) * 1e3:.2f} ms per forward + backward over {steps} steps")
    if not only:
        ratios = [a / b for a, b in zip(times["this"], times["base"])]
        print(f"this / base: median of paired ratios {statistics.median(ratios):.4f}")


if __name__ == "__main__":
    main()
