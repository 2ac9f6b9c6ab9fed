"""bubblewrap sandboxes for untrusted code, one worker slot each.

Each run starts ``prlimit ... -- bwrap ... python3 -I harness.py`` as the slot's own non-root uid
(root switches to it; rlimits like the process count hold only for a non-root uid) with a minimal
environment (bwrap's own pid 1 in the sandbox inherits it: ``--clearenv`` alone would leave the
parent's secrets readable in ``/proc/1/environ``). Inside: every namespace unshared (no network), a
read-only system (``/usr`` and the loader's files only: no home, no repository, no secrets), the
problem directory read-only, a small tmpfs ``/tmp``, a fresh ``/proc``. Limits: CPU time, address
space, processes, file size, open files, no core dumps; the parent enforces a wall-clock limit per
test and kills the whole process group; the pid namespace dies with the sandbox, and a sweep kills
anything of the slot's uid left over. Expected outputs never enter the sandbox.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandlab.errors import SandlabError

log = logging.getLogger(__name__)

HARNESS = Path(__file__).with_name("child.py")
UID_BASE_ENV = "SANDLAB_SANDBOX_UID_BASE"
DEFAULT_UID_BASE = 61000  # slot i runs as uid/gid 61000 + i (no such users need to exist)
MIN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "MALLOC_ARENA_MAX": "1",
           "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
STARTUP_S = 10.0  # bwrap + interpreter start-up before the first test's clock starts


class SandboxUnavailable(SandlabError):
    """bubblewrap cannot isolate code on this machine (missing, no user namespaces, canary failed)."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 6.0  # wall clock per test
    memory_mb: int = 1024  # address space
    processes: int = 64  # processes + threads of the slot uid
    file_mb: int = 32  # largest file written
    open_files: int = 128
    tmpfs_mb: int = 64
    output_mb: int = 16  # stdout captured per test


@dataclass
class RunOutcome:
    """What one sandbox run reported: results by test index, and how it ended."""

    ready: bool = False
    done: bool = False
    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    running: int | None = None  # the test that had started without a result when the run ended
    timed_out: bool = False
    flooded: bool = False
    returncode: int | None = None
    stderr: str = ""


def _default_python() -> str:
    system = Path("/usr/bin/python3")
    return str(system) if system.exists() else str(Path(sys.base_prefix) / "bin" / "python3")


def _proc_uids() -> Iterator[tuple[int, int]]:
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", "rb") as fh:
                for line in fh:
                    if line.startswith(b"Uid:"):
                        yield int(entry.name), int(line.split()[1])
                        break
        except (OSError, ValueError, IndexError):
            continue


def processes_of(uid: int) -> list[int]:
    return [pid for pid, real in _proc_uids() if real == uid]


def wait_until_gone(uid: int, timeout_s: float = 2.0) -> list[int]:
    """Processes of ``uid`` still there after up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = processes_of(uid)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.02)


class Sandbox:
    """``slots`` parallel sandboxes; ``run(job, ...)`` borrows a free slot for one harness run."""

    def __init__(self, slots: int, *, python: str | None = None, allow_unsandboxed: bool = False, isolate: bool = True):
        self.python = python or _default_python()
        self.isolated = True
        self.root = os.geteuid() == 0
        base = int(os.environ.get(UID_BASE_ENV, DEFAULT_UID_BASE))
        self.tmp = Path(tempfile.mkdtemp(prefix="sandlab-verify-"))
        os.chmod(self.tmp, 0o711)  # the slot uids may enter their own directories, not list others
        self._free: queue.Queue[int] = queue.Queue()
        self.uids = [base + i if self.root else os.getuid() for i in range(slots)]
        for i in range(slots):
            for sub in (f"slot{i}", f"private{i}"):
                (self.tmp / sub).mkdir(mode=0o755 if sub.startswith("slot") else 0o700)
            work = self.tmp / f"work{i}"  # the unsandboxed fallback's writable directory
            work.mkdir(mode=0o700)
            if self.root:
                os.chown(work, self.uids[i], self.uids[i])
            shutil.copyfile(HARNESS, self.tmp / f"slot{i}" / "harness.py")
            os.chmod(self.tmp / f"slot{i}" / "harness.py", 0o644)
            self._free.put(i)
        if not Path(self.python).exists():
            self.close()
            raise SandboxUnavailable(f"the sandbox interpreter {self.python} does not exist; install python3 (apt-get install python3) or set verify.python")
        problem = self._unusable() if isolate else "isolation turned off (rlimits only)"
        if problem:
            if not allow_unsandboxed:
                self.close()
                raise SandboxUnavailable(f"{problem}; code verification needs bubblewrap with user namespaces "
                                         "(apt-get install bubblewrap; sysctl kernel.unprivileged_userns_clone=1), "
                                         "or set verify.allow_unsandboxed=true to run code with resource limits only")
            log.warning("code runs UNSANDBOXED (resource limits only): %s", problem)
            self.isolated = False
        if not self.root:
            log.warning("not root: sandboxes run as this uid, so the process limit is not applied (a fork bomb is bounded only by its CPU and wall-clock limits)")

    # ---- the command ---------------------------------------------------------------------------
    def _limits_prefix(self, limits: Limits, cpu_s: float) -> list[str]:
        cpu = max(2, math.ceil(cpu_s))
        mb = 1024 * 1024
        parts = ["prlimit", f"--cpu={cpu}:{cpu + 1}", f"--as={limits.memory_mb * mb}", f"--fsize={limits.file_mb * mb}",
                 f"--nofile={limits.open_files}", "--core=0"]
        if self.root:  # counted per real uid: meaningful only for a uid of its own
            parts.append(f"--nproc={limits.processes}")
        return [*parts, "--"]

    def _bwrap(self, slot: int, limits: Limits) -> list[str]:
        # --as-pid-1: the harness is the namespace's pid 1 (its exit tears the namespace down). With
        # bwrap's own init as pid 1 instead, unprivileged bwrap leaves that init to exit after bwrap
        # itself, reparented to the machine's init, and an init that does not reap (a container's, a
        # microVM's) keeps it as a zombie of the slot uid, counted against the slot's process limit.
        cmd = ["bwrap", "--unshare-all", "--as-pid-1", "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--hostname", "sandbox",
               "--ro-bind", "/usr", "/usr"]
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(top):
                cmd += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                cmd += ["--ro-bind", top, top]
        for etc in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives", "/etc/localtime"):
            cmd += ["--ro-bind-try", etc, etc]
        prefix = Path(self.python).resolve().parents[1]
        if not str(prefix).startswith("/usr"):  # an interpreter outside /usr (pyenv, conda): its install only
            cmd += ["--ro-bind", str(prefix), str(prefix)]
        cmd += ["--proc", "/proc", "--dev", "/dev", "--size", str(limits.tmpfs_mb * 1024 * 1024), "--tmpfs", "/tmp",
                "--ro-bind", str(self.tmp / f"slot{slot}"), "/problem", "--chdir", "/tmp", "--clearenv"]
        for key, value in MIN_ENV.items():
            cmd += ["--setenv", key, value]
        return cmd

    def command(self, slot: int, limits: Limits, cpu_s: float, result_fd: int) -> tuple[list[str], str]:
        """The argv of one run and the job file's path as the harness sees it."""
        if self.isolated:
            return [*self._limits_prefix(limits, cpu_s), *self._bwrap(slot, limits), self.python, "-I", "/problem/harness.py",
                    "/problem/job.json", str(result_fd)], "/tmp/.stdin"
        slot_dir = self.tmp / f"slot{slot}"
        return [*self._limits_prefix(limits, cpu_s), self.python, "-I", str(slot_dir / "harness.py"), str(slot_dir / "job.json"),
                str(result_fd)], str(self.tmp / f"work{slot}" / "stdin")

    # ---- one run ---------------------------------------------------------------------------------
    @contextmanager
    def slot(self) -> Iterator[int]:
        slot = self._free.get()
        try:
            yield slot
        finally:
            self._free.put(slot)

    def sweep(self, slot: int) -> None:
        """Kill whatever of the slot's uid is still running (a daemon that escaped the process group)."""
        if not self.root:
            return
        for pid in processes_of(self.uids[slot]):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _finish(self, proc: subprocess.Popen, slot: int) -> int:
        """End a run and reap it: the sandbox's own processes go first, so bwrap (our child) sees its
        pid 1 end and exits by itself; bwrap's process group last."""
        try:
            return proc.wait(timeout=0.5)  # the harness has ended: bwrap follows by itself
        except subprocess.TimeoutExpired:
            pass
        if self.root:
            for pid in processes_of(self.uids[slot]):
                if pid != proc.pid:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        try:
            return proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return proc.wait()
        finally:
            self.sweep(slot)

    def run(self, slot: int, job: dict[str, Any], limits: Limits, n_tests: int,
            on_result: Callable[[int, dict[str, Any]], bool] | None = None) -> RunOutcome:
        """Run the harness on ``job`` in ``slot``; ``on_result(i, event)`` returning True stops the run
        (the first failing test when no pass fraction is wanted)."""
        slot_dir, private = self.tmp / f"slot{slot}", self.tmp / f"private{slot}"
        read_fd, write_fd = os.pipe()
        argv, stdin_path = self.command(slot, limits, limits.timeout_s * (n_tests + 1) + 1, write_fd)
        job_path = slot_dir / "job.json"
        job_path.write_text(json.dumps({**job, "out_limit": limits.output_mb * 1024 * 1024, "stdin_path": stdin_path}))
        os.chmod(job_path, 0o644)
        nonce = secrets.token_hex(16)
        outcome = RunOutcome()
        uid = self.uids[slot]
        with open(private / "stderr", "w+b") as err:
            kwargs: dict[str, Any] = {"user": uid, "group": uid, "extra_groups": []} if self.root else {}
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err, pass_fds=(write_fd,), env=dict(MIN_ENV),
                                        cwd="/" if self.isolated else str(self.tmp / f"work{slot}"), process_group=0, **kwargs)
            except OSError as exc:
                os.close(read_fd)
                os.close(write_fd)
                outcome.stderr = f"could not start the sandbox: {exc}"
                return outcome
            os.close(write_fd)
            try:
                proc.stdin.write((nonce + "\n").encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self._read_events(read_fd, nonce, limits, outcome, on_result)
            finally:
                os.close(read_fd)
                outcome.returncode = self._finish(proc, slot)
            err.seek(0)
            outcome.stderr = err.read()[-2000:].decode("utf-8", "replace").strip()
        return outcome

    def _read_events(self, fd: int, nonce: str, limits: Limits, outcome: RunOutcome, on_result) -> None:
        max_line = limits.output_mb * 1024 * 1024 * 7 + 65536  # an escaped 16 MB stdout, as JSON
        buffer = b""
        deadline = time.monotonic() + STARTUP_S
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    outcome.timed_out = True
                    return
                if not sel.select(left):
                    continue
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    return  # the process ended (or closed its result channel)
                buffer += chunk
                if len(buffer) > max_line and b"\n" not in buffer:
                    outcome.flooded = True
                    return
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    try:
                        event = json.loads(line)
                    except (ValueError, RecursionError):
                        continue
                    if not isinstance(event, dict) or event.get("n") != nonce:
                        continue  # not the harness's: the untrusted code cannot know the nonce
                    kind = event.get("ev")
                    if kind == "ready":
                        outcome.ready = True
                    elif kind == "start":
                        outcome.running = event.get("t")
                        deadline = time.monotonic() + limits.timeout_s
                    elif kind == "result" and isinstance(event.get("t"), int):
                        outcome.results[event["t"]] = event
                        outcome.running = None
                        if on_result is not None and on_result(event["t"], event):
                            return
                    elif kind == "done":
                        outcome.done = True
                        return

    # ---- start-up check ----------------------------------------------------------------------------
    def _unusable(self) -> str | None:
        """Why bubblewrap cannot contain code here (None: it can). Runs the canary: a probe of the
        network, the environment, the uid and the host's files, then ``kill -9 -1``."""
        if shutil.which("bwrap") is None:
            return "bubblewrap (bwrap) is not installed"
        if shutil.which("prlimit") is None:
            return "prlimit (util-linux) is not installed"
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        port = listener.getsockname()[1]
        secret_key = "SANDLAB_CANARY_SECRET"
        os.environ[secret_key] = "1"
        repo, home = str(Path(__file__).resolve().parents[3]), str(Path.home())
        probe = (
            "import json, os, socket\n"
            f"out = {{'uid': os.getuid(), 'repo': os.path.exists({repo!r}), 'home': os.path.exists({home!r})}}\n"
            f"try:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1); out['net'] = True\n"
            "except OSError:\n    out['net'] = False\n"
            "names = []\n"
            "for pid in os.listdir('/proc'):\n"
            "    if pid.isdigit():\n"
            "        try:\n            names += [kv.split(b'=')[0].decode() for kv in open(f'/proc/{pid}/environ', 'rb').read().split(b'\\0') if kv]\n"
            "        except OSError:\n            pass\n"
            "out['env'] = sorted(set(names))\n"
            "print(json.dumps(out))\n"
        )
        limits = Limits(timeout_s=10.0)
        try:
            with self.slot() as slot:
                outcome = self.run(slot, {"mode": "stdin", "code": probe, "inputs": [""]}, limits, 1)
                result = outcome.results.get(0, {})
                if not outcome.ready or result.get("status") != "ok":
                    reason = outcome.stderr.splitlines()[-1] if outcome.stderr else result.get("msg") or "no result"
                    return f"the bubblewrap sandbox does not start ({reason})"
                seen = json.loads(result["out"])
                try:
                    listener.accept()
                    reached = True
                except BlockingIOError:
                    reached = False
                leaks = [k for k in seen["env"] if k not in MIN_ENV and k != "PWD"]  # bwrap sets PWD for --chdir
                problems = [text for bad, text in (
                    (seen["net"] or reached, "reached a loopback listener"), (seen["repo"] or seen["home"], "sees the host's files"),
                    (self.root and seen["uid"] == 0, "runs as root"), (bool(leaks), f"sees environment variables {leaks[:3]}"),
                ) if bad]
                if problems:
                    return "the sandbox canary " + ", ".join(problems)
                self.run(slot, {"mode": "stdin", "code": "import os\nos.kill(-1, 9)\n", "inputs": [""]}, limits, 1)
                if self.root and wait_until_gone(self.uids[slot]):
                    return "processes of the sandbox uid survived the run"
        finally:
            listener.close()
            os.environ.pop(secret_key, None)
        return None

    def close(self) -> None:
        for slot, uid in enumerate(self.uids):
            if self.root and uid != os.getuid():
                self.sweep(slot)
        shutil.rmtree(self.tmp, ignore_errors=True)
