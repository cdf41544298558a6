"""nanogpt/sandbox.py: hostile programs (an infinite loop, 50 processes that never exit, a 10 GB allocation, writes
outside the scratch folder, a socket to a live server, killing the parent, the evaluator or every process it can)
are each contained and scored as failures, run in parallel beside programs that pass, which still pass; afterwards
no process of the sandbox's uids is left and nothing was written outside. All bounded: no test forks without limit
(we are root, RLIMIT_NPROC binds only the sandbox's own uid)."""
import os
import socket
import threading
import time

import pytest
from conftest import ROOT

from nanogpt.sandbox import FIRST_UID, Limits, check_sandbox, run_program, run_programs

WORKERS = 3
LIMITS = Limits(timeout=2.0, cpu_s=2, memory_mb=512)


def sandbox_processes_after(seconds=5.0):
    """sandbox_processes() once none is left, or after `seconds`: SIGKILLed processes take a moment to be gone."""
    deadline = time.monotonic() + seconds
    while (left := sandbox_processes()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def sandbox_processes():
    """(pid, uid) of every live process run by one of the sandbox's uids."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:  # exited meanwhile
            continue
        uid = int(status["Uid"].split()[0])
        if FIRST_UID <= uid < FIRST_UID + 64 and not status["State"].strip().startswith("Z"):
            found.append((int(pid), uid))
    return found


@pytest.fixture
def listener():
    """A live TCP server on 127.0.0.1 that records every connection it accepts."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    accepted, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                pass
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join()
    server.close()


def hostile_programs(tmp_path, port):
    outside = [str(tmp_path / "escaped.txt"), os.path.join(ROOT, "escaped.txt"), "/root/escaped.txt"]
    return {
        "infinite loop": "while True:\n    pass\n",
        "50 processes that never exit, then waits": (
            "import os, time\nfor _ in range(50):\n    if os.fork() == 0:\n        os.setsid()\n"
            "        while True:\n            time.sleep(1)\nwhile True:\n    time.sleep(1)\n"),
        "50 processes that never exit, then exits 0": (
            "import os, time\nfor _ in range(50):\n    if os.fork() == 0:\n        os.setsid()\n"
            "        while True:\n            time.sleep(1)\nprint('all started')\n"),
        "10 GB allocation": "x = bytearray(10 * 2**30)\nprint(len(x))\n",
        "write outside the scratch folder": (
            f"errors = []\nfor path in {outside!r}:\n    try:\n        open(path, 'w').write('x')\n"
            "    except OSError as e:\n        errors.append(e.strerror)\nprint(errors)\nraise SystemExit(len(errors))\n"),
        "a socket to a live server": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n",
        "kill its parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
        "kill the evaluator": f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)\n",
        "kill every process it can": "import os, signal\nos.kill(-1, signal.SIGKILL)\nraise SystemExit(1)\n",
        "a huge output": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
    }


def test_the_sandbox_is_available_here():
    check_sandbox()  # tests run as root in CI and here: the sandbox must work, not be skipped


def test_hostile_programs_are_contained_and_fail_beside_passing_ones(tmp_path, listener):
    port, accepted = listener
    hostile = hostile_programs(tmp_path, port)
    good = "def f(x):\n    return x + 1\nassert f(1) == 2\nprint('fine')\n"
    names = [name for name in hostile for _ in (0, 1)]  # each twice: mixed with the good ones below
    sources = [s for name in names for s in (hostile[name], good)]
    outcomes = run_programs(sources, LIMITS, workers=WORKERS)
    for i, name in enumerate(names):
        bad, fine = outcomes[2 * i], outcomes[2 * i + 1]
        assert not bad.passed, (name, bad)
        assert fine.passed and fine.output == "fine\n", (name, fine)
    statuses = {name: outcomes[2 * names.index(name)].status for name in hostile}
    assert statuses["infinite loop"] == statuses["50 processes that never exit, then waits"] == "timed out after 2s"
    assert statuses["50 processes that never exit, then exits 0"] == "left processes running"
    assert "MemoryError" in outcomes[2 * names.index("10 GB allocation")].output
    # the test's /tmp folder is not there (a fresh tmpfs), the repo is read-only (or, in a clone under /tmp, hidden
    # by that tmpfs too), /root not even enterable
    hidden = ROOT.startswith(("/tmp/", "/var/tmp/", "/dev/shm/", "/run/lock/"))
    repo = "No such file or directory" if hidden else "Read-only file system"
    assert outcomes[2 * names.index("write outside the scratch folder")].output == \
        f"['No such file or directory', '{repo}', 'Permission denied']\n"
    assert "Network is unreachable" in outcomes[2 * names.index("a socket to a live server")].output
    assert statuses["a huge output"].startswith(("killed by signal", "failed"))  # RLIMIT_FSIZE: SIGXFSZ
    assert accepted == []  # no connection reached the server
    assert not os.path.exists(tmp_path / "escaped.txt") and not os.path.exists(os.path.join(ROOT, "escaped.txt"))
    assert not os.path.exists("/root/escaped.txt")
    assert sandbox_processes_after() == []  # every process tree is gone


def test_the_scratch_folder_is_private_writable_and_gone_afterwards():
    source = ("import os\nopen('note.txt', 'w').write('hi')\nprint(os.getcwd(), os.environ['HOME'], os.getuid(), "
              "open('note.txt').read(), len([p for p in os.listdir('/proc') if p.isdigit()]))\n")
    outcome = run_program(source, LIMITS, slot=5)
    assert outcome.passed, outcome
    assert outcome.output == f"/tmp/scratch /tmp/scratch {FIRST_UID + 5} hi 2\n"  # init and the program only
    assert not os.path.exists("/tmp/scratch/note.txt")


def test_a_failing_program_reports_its_exit_status_and_output():
    outcome = run_program("import sys\nprint('before')\nsys.exit(3)\n", LIMITS)
    assert (outcome.passed, outcome.status, outcome.output) == (False, "failed (exit 3)", "before\n")
    outcome = run_program("assert 1 + 1 == 3\n", LIMITS)
    assert outcome.status == "failed (exit 1)" and "AssertionError" in outcome.output


def test_without_root_nothing_runs_and_the_reason_is_one_line(monkeypatch):
    from nanogpt import sandbox
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 1000)
    with pytest.raises(sandbox.SandboxError, match="the sandbox needs root"):
        check_sandbox()
