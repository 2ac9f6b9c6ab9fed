"""Grading with hard per-item time limits, usable from any thread and from worker processes.

Why processes: math-verify's own timeouts rely on ``signal.alarm``, which only works on the main
thread and cannot interrupt long C calls (e.g. a big-integer power inside sympy). The only limit
that always holds is killing the process doing the work, so math items that are not decided
cheaply go to persistent worker processes; on timeout the worker is killed, the item counts as
incorrect (reason ``"timeout"``) and a replacement is started.

Workers are started with the "spawn" method: forking a process that runs threads (vLLM, tokenizer
pools, this module's callers) can deadlock the child. As with any spawn-based pool, a script that
uses it at import time must guard its entry point with ``if __name__ == "__main__":``.

Pool size (``num_workers=None``): the CPUs this process may run on (``os.sched_getaffinity``, which
honours ``taskset``/cpusets, unlike ``os.cpu_count``), shared among the ranks of this node when
launched by torchrun/accelerate (``LOCAL_WORLD_SIZE``), at most ``max_workers`` per process (default
8, or ``$SANDLAB_GRADING_MAX_WORKERS``), at least 1. See ``default_num_workers``.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from sandlab.config import AnswerRule
from sandlab.grading.extract import extract_choice, extract_math_answer
from sandlab.grading.math_equiv import fast_equal, numeric_verdict
from sandlab.grading.types import (
    CHOICE,
    ERROR,
    KINDS,
    MATH_VERIFY,
    NO_ANSWER,
    NUMBER_MATCH,
    STRING_MATCH,
    TIMEOUT,
    GradeItem,
    GradeResult,
)

__all__ = ["GradingPool", "grade", "decide_cheaply", "default_num_workers", "DEFAULT_MAX_WORKERS"]

_MCQ_LETTERS = "ABCDEFGHIJ"

# Per-process cap on the automatic pool size. An item is 1-3 ms of math-verify, so a few workers keep
# up with any batch; each worker is a process with sympy imported (0.6-1.6 s to start, ~60 MB
# resident), and every training rank and data job on a node starts its own pool.
DEFAULT_MAX_WORKERS = 8
MAX_WORKERS_ENV = "SANDLAB_GRADING_MAX_WORKERS"


def _available_cpus() -> int:
    """CPUs this process may run on (its affinity mask), else the machine's CPU count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _local_ranks(environ: Mapping[str, str]) -> int:
    """Processes of this job on this node (torchrun and ``accelerate launch`` set LOCAL_WORLD_SIZE)."""
    try:
        return max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def default_num_workers(max_workers: int | None = None, environ: Mapping[str, str] | None = None) -> int:
    """The automatic pool size: this process's share of the CPUs, capped at ``max_workers``, at least 1.

    ``cpus // LOCAL_WORLD_SIZE``: under torchrun every rank has the same affinity mask, so each takes
    its share rather than one worker per CPU each. ``max_workers`` defaults to
    ``$SANDLAB_GRADING_MAX_WORKERS`` or ``DEFAULT_MAX_WORKERS``.
    """
    env = os.environ if environ is None else environ
    if max_workers is None:
        raw = env.get(MAX_WORKERS_ENV, "").strip()
        try:
            max_workers = int(raw) if raw else DEFAULT_MAX_WORKERS
        except ValueError:
            raise ValueError(f"{MAX_WORKERS_ENV}={raw!r} is not a whole number") from None
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    return max(1, min(max_workers, _available_cpus() // _local_ranks(env)))


class _TimeoutFlag(logging.Handler):
    """Notices math-verify's "Timeout during parsing/comparison" warnings.

    math-verify swallows its own timeouts and returns False; this turns them back into a
    ``"timeout"`` reason. Having a handler also keeps those warnings off the worker's stderr.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.fired = False

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Timeout during"):
            self.fired = True


def _worker_main(conn: Connection) -> None:
    """Worker loop: receive ``(gold, pred, soft_timeout)``; reply ``("ok" | "timeout", bool)`` or ``("error", msg)``."""
    # Ctrl-C reaches the whole process group; the parent decides what happens to its workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from sandlab.grading.math_equiv import math_equal, warm_up

    flag = _TimeoutFlag()
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addHandler(flag)

    # Import sympy and build math-verify's parsers before reporting ready, so the first item's
    # deadline is not spent on start-up.
    warm_up()
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # parent is gone
            return
        if msg is None:
            return
        gold, pred, soft_timeout = msg
        flag.fired = False
        try:
            # On the worker's main thread math-verify's signal timeouts work; they end most slow
            # comparisons without losing the worker. The parent's kill is the backstop.
            equal = math_equal(gold, pred, timeout_s=soft_timeout)
            reply: tuple[str, Any] = ("timeout" if flag.fired and not equal else "ok", equal)
        except BaseException as exc:  # math-verify's TimeoutException derives from BaseException
            reply = ("error", f"{type(exc).__name__}: {exc}")
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return


@dataclass(eq=False)  # identity semantics: workers are found and replaced by identity
class _Worker:
    proc: Any  # multiprocessing.context.SpawnProcess
    conn: Connection
    start_deadline: float
    ready: bool = False
    # (index in the batch, extracted prediction, deadline) of the item being graded, if any.
    task: tuple[int, str, float] | None = None


def _stop_worker(worker: _Worker, graceful: bool) -> None:
    """Stop one worker: ask it to exit when ``graceful``, kill it if it does not (or at once)."""
    if graceful and worker.proc.is_alive():
        try:
            worker.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        worker.proc.join(timeout=2)
    if worker.proc.is_alive():
        worker.proc.kill()
        worker.proc.join(timeout=5)
    worker.conn.close()


def _shutdown(workers: list[_Worker], owner_pid: int) -> None:
    """Finalizer: stop all workers (only in the process that started them)."""
    if os.getpid() != owner_pid:
        return
    while workers:
        _stop_worker(workers.pop(), graceful=True)


def decide_cheaply(item: GradeItem) -> tuple[GradeResult | None, str | None]:
    """Grade ``item`` in-process when no maths is needed; else ``(None, extracted prediction)``.

    Multiple-choice items, responses without an answer, answers equal to the gold after textual
    normalisation, and plain numbers that ``numeric_verdict`` decides never need math-verify, so they
    skip the worker round-trip. Math answers are read by ``item.rule`` (see ``sandlab.grading.extract``).
    """
    if item.kind not in KINDS:
        raise ValueError(f"unknown grading kind {item.kind!r}; expected one of {', '.join(KINDS)}")
    if item.kind == "mcq":
        gold = extract_choice(item.gold, _MCQ_LETTERS) or item.gold.strip().upper()
        # Read letters up to the gold's (at least A-D) so that "Answer: I think..." is not option I.
        last = max("D", gold) if len(gold) == 1 and gold in _MCQ_LETTERS else "D"
        pred = extract_choice(item.response, _MCQ_LETTERS[: _MCQ_LETTERS.index(last) + 1])
        if pred is None:
            return GradeResult(None, False, NO_ANSWER), None
        return GradeResult(pred, pred == gold, CHOICE), pred
    pred = extract_math_answer(item.response, item.rule)
    if pred is None:
        return GradeResult(None, False, NO_ANSWER), None
    if fast_equal(item.gold, pred):
        return GradeResult(pred, True, STRING_MATCH), pred
    if (verdict := numeric_verdict(item.gold, pred)) is not None:
        return GradeResult(pred, verdict, NUMBER_MATCH), pred
    return None, pred


class GradingPool:
    """Persistent worker processes that grade math answers under a hard per-item time limit.

    ``grade_many`` may be called from any thread (calls are serialised) and from inside worker
    processes such as ``ProcessPoolExecutor`` workers. Use as a context manager or call ``close()``.

    ``num_workers`` is used as given; when None the pool sizes itself (``default_num_workers``: the
    CPUs of this process's affinity mask divided among the node's local ranks, at most
    ``max_workers``). Workers start lazily, as many as a batch needs, up to that size.
    """

    def __init__(
        self,
        num_workers: int | None = None,
        timeout_s: float = 5.0,
        start_timeout_s: float = 120.0,
        *,
        max_workers: int | None = None,
    ):
        self.num_workers = num_workers if num_workers is not None else default_num_workers(max_workers)
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.start_timeout_s = start_timeout_s
        self._ctx = mp.get_context("spawn")
        self._lock = threading.Lock()
        self._closed = False
        self._init_owner()

    def _init_owner(self) -> None:
        # A pool copied into a forked child must not touch the parent's workers: track the owner.
        self._pid = os.getpid()
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._workers, self._pid)

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> GradingPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start all workers and wait until they are ready (optional: grading starts them lazily)."""
        with self._lock:
            self._check_usable()
            self._spawn_upto(self.num_workers)
            self._run(deque(), [], self.timeout_s, wait_ready=True)

    def close(self) -> None:
        """Stop the workers. The pool cannot be used afterwards."""
        with self._lock:
            self._closed = True
            if self._pid == os.getpid():
                self._finalizer()

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("GradingPool is closed")
        if self._pid != os.getpid():
            self._finalizer.detach()
            self._init_owner()

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_main, args=(child_conn,), name="sandlab-grader", daemon=True)
        proc.start()
        child_conn.close()  # so that the parent sees EOF when the worker dies
        return _Worker(proc, parent_conn, start_deadline=time.monotonic() + self.start_timeout_s)

    def _spawn_upto(self, n: int) -> None:
        while len(self._workers) < min(n, self.num_workers):
            self._workers.append(self._spawn())

    def _replace(self, worker: _Worker) -> None:
        """Kill ``worker`` (whatever it is doing) and put a fresh one in its slot."""
        worker.task = None
        _stop_worker(worker, graceful=False)
        self._workers[self._workers.index(worker)] = self._spawn()

    # -- grading -----------------------------------------------------------------------------

    def grade_many(self, items: list[GradeItem], *, desc: str | None = None) -> list[GradeResult]:
        """Grade ``items`` concurrently over the workers; results are in input order.

        With ``desc``, a progress bar advances per chunk of items (chunks keep every worker busy).
        """
        if desc is None:
            return self._grade(items, self.timeout_s)
        from tqdm.auto import tqdm  # noqa: PLC0415

        chunk = 64 * self.num_workers
        results: list[GradeResult] = []
        with tqdm(total=len(items), desc=desc, unit="item", dynamic_ncols=True) as bar:
            for start in range(0, len(items), chunk):
                part = items[start : start + chunk]
                results += self._grade(part, self.timeout_s)
                bar.update(len(part))
        return results

    def _grade(self, items: list[GradeItem], timeout_s: float) -> list[GradeResult]:
        results: list[GradeResult | None] = [None] * len(items)
        pending: deque[tuple[int, str, str]] = deque()
        # Identical (gold, prediction) pairs (k samples agreeing on one answer) go to a worker once.
        first: dict[tuple[str, str], int] = {}
        copies: list[tuple[int, int]] = []
        for i, item in enumerate(items):
            decided, pred = decide_cheaply(item)
            if decided is not None:
                results[i] = decided
            else:
                assert pred is not None
                key = (item.gold, pred)
                if key in first:
                    copies.append((i, first[key]))
                    continue
                first[key] = i
                pending.append((i, item.gold, pred))
        if pending:
            with self._lock:
                self._check_usable()
                self._spawn_upto(len(pending))
                self._run(pending, results, timeout_s)
        for i, j in copies:
            results[i] = results[j]
        return [r for r in results if r is not None]

    def _run(
        self,
        pending: deque[tuple[int, str, str]],
        results: list[GradeResult | None],
        timeout_s: float,
        wait_ready: bool = False,
    ) -> None:
        """Dispatch ``pending`` over the workers until every item has a result.

        Workers still starting (e.g. replacements of killed ones) are only waited for while there
        is work left for them, or when ``wait_ready`` asks for a fully started pool.
        """
        try:
            self._dispatch(pending, results, timeout_s, wait_ready)
        except BaseException:
            # Start-up failure or Ctrl-C mid-batch: workers may still hold items of this batch whose
            # replies would be misread by the next call, so stop them all; the next call respawns.
            _shutdown(self._workers, self._pid)
            raise

    def _dispatch(
        self,
        pending: deque[tuple[int, str, str]],
        results: list[GradeResult | None],
        timeout_s: float,
        wait_ready: bool,
    ) -> None:
        # math-verify's signal timeouts (whole seconds) fire first for ordinary slow comparisons,
        # which keeps the worker alive; the kill at ``timeout_s`` catches what they cannot stop.
        soft_timeout = max(1, int(timeout_s / 2))
        while True:
            now = time.monotonic()
            for w in self._workers:
                if w.ready and w.task is None and pending:
                    idx, gold, pred = pending.popleft()
                    try:
                        w.conn.send((gold, pred, soft_timeout))
                    except (BrokenPipeError, OSError):  # died while idle: retry the item elsewhere
                        pending.appendleft((idx, gold, pred))
                        self._replace(w)
                        continue
                    w.task = (idx, pred, now + timeout_s)
            busy = [w for w in self._workers if w.task is not None]
            starting = [w for w in self._workers if not w.ready] if (pending or wait_ready) else []
            waiting = busy + starting
            if not waiting:
                return
            deadline = min(w.task[2] if w.task is not None else w.start_deadline for w in waiting)
            ready = wait([w.conn for w in waiting], timeout=max(0.0, deadline - time.monotonic()))
            for w in list(waiting):
                if w.conn in ready:
                    self._receive(w, results)
            now = time.monotonic()
            for w in waiting:
                if w not in self._workers:  # already replaced after dying
                    continue
                if w.task is not None and now >= w.task[2]:
                    idx, pred, _ = w.task
                    results[idx] = GradeResult(pred, False, TIMEOUT)
                    self._replace(w)
                elif not w.ready and now >= w.start_deadline:
                    self._replace(w)
                    raise RuntimeError(f"grading worker did not start within {self.start_timeout_s:.0f} s")

    def _receive(self, w: _Worker, results: list[GradeResult | None]) -> None:
        try:
            kind, value = w.conn.recv()
        except (EOFError, OSError):
            if w.task is None:  # died while starting: the environment is broken, don't loop
                w.proc.join(timeout=5)
                code = w.proc.exitcode
                raise RuntimeError(f"grading worker exited during start-up (exit code {code})") from None
            idx, pred, _ = w.task  # killed under us (e.g. out of memory): count it incorrect
            results[idx] = GradeResult(pred, False, ERROR)
            self._replace(w)
            return
        if kind == "ready":
            w.ready = True
            return
        assert w.task is not None
        idx, pred, _ = w.task
        w.task = None
        reason = {"ok": MATH_VERIFY, "timeout": TIMEOUT}.get(kind, ERROR)
        results[idx] = GradeResult(pred, kind == "ok" and bool(value), reason)


_default_pool: GradingPool | None = None
_default_lock = threading.Lock()


def grade(response: str, gold: str, kind: str = "math", timeout_s: float = 5.0, rule: AnswerRule | str = AnswerRule.multi) -> GradeResult:
    """Grade one response (math answers read by ``rule``). Items that need math-verify go to a shared
    single-worker pool.

    For many items use ``GradingPool.grade_many``, which runs them concurrently.
    """
    global _default_pool
    item = GradeItem(response, gold, kind, AnswerRule(rule))
    decided, _ = decide_cheaply(item)
    if decided is not None:
        return decided
    with _default_lock:
        if _default_pool is None or _default_pool._closed:
            _default_pool = GradingPool(num_workers=1, timeout_s=timeout_s)
        pool = _default_pool
    return pool._grade([item], timeout_s)[0]
