"""Programs/s of the HumanEval sandbox (nanogpt/sandbox.py): the 164 canonical solutions, each program in its own
namespaces, uid and limits, with 1, 2 and 4 run at a time; also the wall time of one trivial program.

    python bench/sandbox.py --repeats=3          # as root (the sandbox needs it); bench/RESULTS.md has the table
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from configurator import at_least, configure  # noqa: E402
from nanogpt.sandbox import Limits, check_sandbox, run_program, run_programs  # noqa: E402
from nanogpt.tasks import humaneval  # noqa: E402
from nanogpt.tasks.common import Settings  # noqa: E402

data_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")  # HumanEval
workers = "1,2,4"              # programs run at a time, each measured
repeats = 3                    # runs per setting (the median is reported)


def main():
    config = configure(globals())
    at_least(config, 1, "repeats")
    check_sandbox()
    problems = humaneval.read_problems(Settings(data_dir=data_dir))
    sources = [humaneval.program(p, p.canonical_solution) for p in problems]
    trivial = [run_program("pass", Limits()).seconds for _ in range(10)]
    print(f"one trivial program: median {statistics.median(trivial) * 1000:.0f} ms wall (launcher, namespaces, "
          f"interpreter start)")
    print(f"{'workers':>7}  {'median s':>8}  {'programs/s':>10}  passed")
    for w in map(int, workers.split(",")):
        times, passed = [], 0
        for _ in range(repeats):
            start = time.time()
            outcomes = run_programs(sources, Limits(), w)
            times.append(time.time() - start)
            passed = sum(o.passed for o in outcomes)
        median = statistics.median(times)
        print(f"{w:>7}  {median:>8.2f}  {len(sources) / median:>10.1f}  {passed}/{len(sources)}")


if __name__ == "__main__":
    main()
