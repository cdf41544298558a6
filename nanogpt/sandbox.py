"""Run untrusted Python programs (code a model wrote) one at a time or many in parallel, each contained.

Each program runs in its own process tree under fresh Linux namespaces, which is why the sandbox needs root (or
CAP_SYS_ADMIN); without them it refuses to run anything (check_sandbox says so in one line):

- a PID namespace whose init (pid 1) is a small root process that starts the program and reaps orphans; when the
  program exits, init exits and the kernel kills everything left in the namespace (stragglers that called setsid,
  double-forked daemons), and on a timeout the evaluator kills the launcher's process group, init with it;
- a network namespace with nothing in it (not even loopback up): no connection goes anywhere;
- a mount namespace: the whole file system is remounted read-only, and fresh small tmpfs mounts cover the
  world-writable folders (/tmp, /var/tmp, /dev/shm, /run/lock); the scratch folder, the program's cwd and HOME, is
  /tmp/scratch on that tmpfs and vanishes with the namespace; /proc shows the namespace's processes only;
- an unprivileged uid of its own (FIRST_UID + a slot per parallel run, no groups): it can signal no process but
  its own, write no file root owns, and RLIMIT_NPROC (which does not bind root) caps its processes;
- resource limits: RLIMIT_CPU (seconds of CPU), RLIMIT_AS (address space), RLIMIT_FSIZE (bytes of any one file
  written, stdout included), RLIMIT_NPROC, RLIMIT_NOFILE, no core dumps; and a wall-clock timeout.

A program passes when it exits with status 0 in time and leaves no process running (the HumanEval release's own
guard disables fork, kill and subprocess outright). Its stdout and stderr go to one temporary file (capped by
RLIMIT_FSIZE) of which the last TAIL characters are kept.
"""
import os
import queue
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

FIRST_UID = 61000          # the uids FIRST_UID .. FIRST_UID + workers - 1 run programs, one per parallel slot
SETUP_FAILED = 97          # the launcher's exit status when a namespace, mount or limit cannot be set up
LEFT_RUNNING = 98          # init's exit status when the program exited 0 but left processes running
TAIL = 2000                # characters of a program's output kept

# The launcher: `python -I -S -c LAUNCHER uid cpu_s memory_bytes file_bytes nproc`, the program on stdin. It runs as
# root in its own session, makes the namespaces, and forks init (pid 1 of the new PID namespace), which mounts,
# writes the program into the scratch folder and forks the program under its own uid and limits.
LAUNCHER = r"""
import ctypes, os, resource, sys
uid, cpu_s, memory, file_bytes, nproc = map(int, sys.argv[1:6])
program = sys.stdin.buffer.read()
libc = ctypes.CDLL(None, use_errno=True)
NEWNS, NEWNET, NEWPID = 0x20000, 0x40000000, 0x20000000
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18

def check(rc, what):
    if rc != 0:
        sys.stderr.write(f"sandbox: {what} failed ({os.strerror(ctypes.get_errno())})\n")
        os._exit(%(SETUP_FAILED)d)

def mount(source, target, kind, flags, data, what):
    check(libc.mount(source, target, kind, flags, data), what)

def exit_code(status):
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code

check(libc.unshare(NEWNS | NEWNET | NEWPID), "unshare (needs root or CAP_SYS_ADMIN)")
init = os.fork()
if init:
    os._exit(exit_code(os.waitpid(init, 0)[1]))
mount(None, b"/", None, REC | PRIVATE, None, "making mounts private")
mount(b"/", b"/", None, BIND | REC, None, "binding /")
mount(None, b"/", None, REMOUNT | BIND | RDONLY, None, "remounting / read-only")
for folder in (b"/tmp", b"/var/tmp", b"/dev/shm", b"/run/lock"):
    if os.path.isdir(folder):
        mount(b"tmpfs", folder, b"tmpfs", NOSUID | NODEV, b"size=64m,mode=1777", "mounting tmpfs on " + folder.decode())
mount(b"proc", b"/proc", b"proc", NOSUID | NODEV | NOEXEC, None, "mounting /proc")
# the interpreter's own install, read-only at /tmp/python (it may sit in a folder the program's uid cannot enter)
os.mkdir("/tmp/python")
mount(sys.base_prefix.encode(), b"/tmp/python", None, BIND | REC, None, "binding the Python install")
mount(None, b"/tmp/python", None, REMOUNT | BIND | RDONLY, None, "remounting the Python install read-only")
python = os.path.join("/tmp/python", os.path.relpath(os.path.realpath(sys.executable), sys.base_prefix))
os.mkdir("/tmp/scratch", 0o700)
with open("/tmp/scratch/program.py", "wb") as f:
    f.write(program)
os.chown("/tmp/scratch", uid, uid)
os.chown("/tmp/scratch/program.py", uid, uid)
child = os.fork()
if child == 0:
    try:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        for limit, value in ((resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, memory),
                             (resource.RLIMIT_FSIZE, file_bytes), (resource.RLIMIT_NPROC, nproc),
                             (resource.RLIMIT_NOFILE, 256), (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(limit, (value, value))
        os.chdir("/tmp/scratch")
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp/scratch", "LANG": "C.UTF-8"}
        os.execve(python, [python, "-I", "program.py"], env)
    except OSError as e:
        sys.stderr.write(f"sandbox: dropping to uid {uid} failed ({e})\n")
    os._exit(%(SETUP_FAILED)d)
while True:  # init: reap every orphan until the program itself exits; then the kernel kills the rest
    pid, status = os.wait()
    if pid == child:
        break
while True:  # reap the orphans that have already exited
    try:
        if os.waitpid(-1, os.WNOHANG)[0] == 0:
            break
    except ChildProcessError:
        break
def alive(pid):  # not a zombie about to be reaped
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
left = [p for p in os.listdir("/proc") if p.isdigit() and p != "1" and alive(p)]
os._exit(%(LEFT_RUNNING)d if left and exit_code(status) == 0 else exit_code(status))
""" % {"SETUP_FAILED": SETUP_FAILED, "LEFT_RUNNING": LEFT_RUNNING}


class SandboxError(RuntimeError):
    """The sandbox cannot be set up on this machine (no root, no namespaces): nothing was run."""


@dataclass(frozen=True)
class Limits:
    timeout: float = 3.0         # wall-clock seconds (the HumanEval release's default)
    cpu_s: int = 4               # seconds of CPU
    memory_mb: int = 1024        # address space
    file_mb: int = 16            # bytes of any one file written (stdout included)
    nproc: int = 64              # processes of the program's uid


@dataclass
class Outcome:
    passed: bool
    status: str                  # 'passed', 'failed (exit N)', 'timed out after Ss', 'killed by signal N'
    output: str                  # the last TAIL characters of stdout and stderr
    seconds: float


def describe(returncode, timed_out, timeout):
    if timed_out:
        return f"timed out after {timeout:g}s"
    if returncode == 0:
        return "passed"
    if returncode == LEFT_RUNNING:
        return "left processes running"
    if returncode > 128:
        return f"killed by signal {returncode - 128}"
    return f"failed (exit {returncode})"


def run_program(source, limits=Limits(), slot=0):
    """Run one Python program in the sandbox as uid FIRST_UID + slot (one slot per run in progress) -> Outcome.
    Raises SandboxError when the sandbox itself could not be set up."""
    start = time.time()
    args = [FIRST_UID + slot, limits.cpu_s, limits.memory_mb << 20, limits.file_mb << 20, limits.nproc]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", LAUNCHER, *map(str, args)], stdin=subprocess.PIPE,
                                stdout=log, stderr=log, start_new_session=True)
        timed_out = False
        try:
            proc.stdin.write(source.encode())
            proc.stdin.close()
        except BrokenPipeError:  # the launcher died at once: its status says why
            pass
        try:
            proc.wait(timeout=limits.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            kill_group(proc.pid)  # the launcher's group holds init: killing it ends the namespace
            proc.wait()
        log.seek(0)
        output = log.read()[-4 * TAIL:].decode("utf-8", "replace")[-TAIL:]
    if proc.returncode == SETUP_FAILED and output.startswith("sandbox:"):
        raise SandboxError(output.strip().splitlines()[-1])
    status = describe(proc.returncode, timed_out, limits.timeout)
    return Outcome(status == "passed", status, output, time.time() - start)


def kill_group(pgid):
    try:
        os.killpg(pgid, 9)
    except ProcessLookupError:
        pass


def check_sandbox():
    """Raise SandboxError (one line: what is missing) unless a trivial program runs and passes in the sandbox."""
    if os.name != "posix" or not sys.platform.startswith("linux"):
        raise SandboxError("the sandbox needs Linux namespaces; run the code evaluation on Linux")
    if os.geteuid() != 0:
        raise SandboxError("the sandbox needs root (namespaces, a uid of its own for each program): run the code "
                           "evaluation as root, e.g. in a container")
    outcome = run_program("print('ok')", Limits(timeout=30))
    if not outcome.passed:
        raise SandboxError(f"a trivial program did not pass in the sandbox ({outcome.status}: "
                           f"{outcome.output.strip()[-200:]})")


def run_programs(sources, limits=Limits(), workers=2, progress=None):
    """Outcomes of many programs, `workers` at a time, each in its own sandbox and uid slot; progress(i) is called
    as each finishes (e.g. a tqdm bar's update)."""
    slots = queue.Queue()
    for slot in range(workers):
        slots.put(slot)

    def one(source):
        slot = slots.get()
        try:
            return run_program(source, limits, slot)
        finally:
            slots.put(slot)
            if progress:
                progress(1)
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, sources))
