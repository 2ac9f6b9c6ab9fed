"""The harness that runs untrusted code inside the sandbox (stdlib only; copied into the problem
directory, never imported by sandlab itself).

Usage: ``python3 -I harness.py <job.json> <result fd>``; the first line on stdin is the run's nonce.
It runs each test in order and writes one JSON line per event to the result fd, each carrying the
nonce: ``ready``, ``start`` (test i begins: the parent's wall clock for it starts), and the test's
outcome: ``ok`` with the captured stdout (stdin tests) or the JSON of the return value (functional
tests), or ``error`` with a kind (memory, runtime, output_limit) and a message. Nothing is compared
here: expected outputs never enter the sandbox. After the last test it writes ``done`` and leaves
with ``os._exit`` at once, so ``atexit`` handlers and finalisers of the untrusted code never run.
"""

import io
import json
import os
import sys
import types

# Bound before any untrusted code runs, so monkeypatching os, json or builtins later cannot reach them.
_write = os.write
_read = os.read
_encode_str = json.encoder.encode_basestring_ascii
_exit = os._exit
_dup2 = os.dup2
_open = os.open
_close = os.close
_isinstance = isinstance
_type = type
_len = len
_str = str
_int_repr = int.__repr__
_float_repr = float.__repr__
_str_str = str.__str__
_list_iter = list.__iter__
_tuple_iter = tuple.__iter__
_dict_items = dict.items
_EXACT = (list, tuple, dict, int, float, bool, str)
# Ways to reach the harness's frames (and the nonce in them) or search the heap for it.
_BLOCKED_EVENTS = {"sys._getframe", "sys._current_frames", "gc.get_objects", "gc.get_referrers", "gc.get_referents"}
_BLOCKED_ATTRS = {"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back"}


def _audit(event, args):
    if event in _BLOCKED_EVENTS:
        raise ValueError(event + " is not available here")  # what namedtuple/typing/enum already tolerate
    if event == "object.__getattr__" and _len(args) > 1 and args[1] in _BLOCKED_ATTRS:
        raise AttributeError(args[1] + " is not available here")

# LiveCodeBench's prelude idea: LeetCode code uses List[int], deque, heapq... without importing them.
PRELUDE = """\
from string import *
from re import *
from datetime import *
from collections import *
from heapq import *
from bisect import *
from copy import *
from math import *
from random import *
from statistics import *
from itertools import *
from functools import *
from operator import *
from io import *
from sys import *
from json import *
from builtins import *
from typing import *
import string, re, datetime, collections, heapq, bisect, copy, math, random, statistics, itertools, functools, operator, io, sys, json
sys.setrecursionlimit(50000)
"""


class OutputLimit(BaseException):
    """The test's stdout passed its size limit (a BaseException: ``except Exception`` cannot hide it)."""


class _LimitedBuffer(io.BytesIO):
    def __init__(self, limit):
        super().__init__()
        self._limit = limit

    def write(self, data):
        if self.tell() + len(data) > self._limit:
            raise OutputLimit()
        return super().write(data)


class Unserialisable(Exception):
    pass


def make_encoder():
    """JSON of a return value built from exact base types only: an object with a forged ``__eq__``,
    ``__str__`` or ``__iter__`` cannot pass as something else (subclasses of int, float and str are
    read through the base type's own methods). A closure, so the untrusted code cannot swap it for
    another function through this module's globals."""

    def to_json(value, depth=0):
        if depth > 200:
            raise Unserialisable("nested too deeply")
        if value is None:
            return "null"
        if value is True or value is False:
            return "true" if value else "false"
        if _isinstance(value, int):
            return _int_repr(value)
        if _isinstance(value, float):
            text = _float_repr(value)
            return {"inf": "Infinity", "-inf": "-Infinity", "nan": "NaN"}.get(text, text)
        if _isinstance(value, str):
            return _encode_str(_str_str(value))
        kind = _type(value)
        if kind is list or kind is tuple:
            return "[" + ",".join([to_json(v, depth + 1) for v in (_list_iter(value) if kind is list else _tuple_iter(value))]) + "]"
        if kind is dict:
            items = []
            for k, v in _dict_items(value):
                key_type = _type(k)
                if key_type is str:
                    key = _encode_str(k)
                elif k is None or key_type in (int, float, bool):  # json.dumps writes such keys as strings too
                    key = '"' + to_json(k, depth + 1).strip('"') + '"'
                else:
                    raise Unserialisable("a dict key of type " + key_type.__name__)
                items.append(key + ":" + to_json(v, depth + 1))
            return "{" + ",".join(items) + "}"
        raise Unserialisable("cannot serialise a " + kind.__name__)

    return to_json


def main():
    job_path, fd = sys.argv[1], int(sys.argv[2])
    nonce = _read(0, 64).decode().strip()  # read unbuffered: no Python object keeps a copy of it
    to_json, write = make_encoder(), _write

    def emit(event):
        event["n"] = nonce
        data = (to_json(event) + "\n").encode()
        while data:
            data = data[write(fd, data):]

    with open(job_path, encoding="utf-8") as fh:
        job = json.load(fh)
    sys.set_int_max_str_digits(0)  # big-integer answers print in full
    mode, inputs, out_limit = job["mode"], job["inputs"], int(job["out_limit"])
    prelude_ns = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(compile(PRELUDE, "<prelude>", "exec"), prelude_ns)
    try:
        code = compile(job["code"], "<solution>", "exec")
    except (SyntaxError, ValueError) as exc:
        code, compile_error = None, f"{type(exc).__name__}: {exc}"
    # The untrusted code may not walk up into this frame (the nonce) or search the heap for it.
    sys.addaudithook(_audit)
    sys.modules["__main__"] = types.ModuleType("__main__")  # this module's globals out of reach
    real_stdout = sys.stdout
    emit({"ev": "ready"})
    if code is None:
        emit({"ev": "result", "t": 0, "status": "error", "kind": "runtime", "msg": compile_error})
        emit({"ev": "done"})
        _exit(0)

    def failure(exc):
        if isinstance(exc, MemoryError):
            return {"status": "error", "kind": "memory", "msg": "MemoryError"}
        if isinstance(exc, OutputLimit):
            return {"status": "error", "kind": "output_limit", "msg": f"stdout passed {out_limit} bytes"}
        return {"status": "error", "kind": "runtime", "msg": (type(exc).__name__ + ": " + str(exc))[:500]}

    module_ns = None
    if mode in ("functional", "program"):
        module_ns = dict(prelude_ns)
        emit({"ev": "start", "t": -1})
        try:
            exec(code, module_ns)
        except BaseException as exc:  # noqa: BLE001 (SystemExit too: a module that exits has no function to call)
            for i in range(len(inputs)):
                emit({"ev": "result", "t": i, **failure(exc)})
            emit({"ev": "done"})
            _exit(0)
    for i, test_input in enumerate(inputs):
        emit({"ev": "start", "t": i})
        if mode == "stdin":
            # The input is a file on fd 0, so input(), sys.stdin.buffer and open(0) all read it.
            path = job["stdin_path"]
            with open(path, "wb") as fh:
                fh.write(test_input.encode())
            in_fd = _open(path, os.O_RDONLY)
            _dup2(in_fd, 0)
            _close(in_fd)
            buffer = _LimitedBuffer(out_limit)
            sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
            captured = io.TextIOWrapper(buffer, encoding="utf-8", write_through=True)
            sys.stdout = captured
            try:
                try:
                    exec(code, dict(prelude_ns))
                except SystemExit:  # exit() after printing the answer is a normal end
                    pass
                captured.flush()
                outcome = {"status": "ok"}
            except BaseException as exc:  # noqa: BLE001
                outcome = failure(exc)
            sys.stdout = real_stdout
            if outcome["status"] == "ok":
                # Read before the wrapper is dropped: collecting it closes the buffer.
                outcome["out"] = buffer.getvalue().decode("utf-8", "replace") if not buffer.closed else ""
            del captured
        elif mode == "functional":
            try:
                args = [json.loads(line) for line in test_input.split("\n") if line.strip()]
                fn = module_ns.get(job["fn_name"])
                if not callable(fn):
                    solution = module_ns.get("Solution")
                    if solution is None:
                        raise NameError(f"neither {job['fn_name']}() nor class Solution is defined")
                    fn = getattr(solution(), job["fn_name"])
                outcome = {"status": "ok", "res": to_json(fn(*args))}
            except BaseException as exc:  # noqa: BLE001 (SystemExit included: a function must return)
                outcome = failure(exc)
        else:  # program: the test code runs in the solution's namespace; passing = raising nothing
            try:
                exec(compile(test_input, "<test>", "exec"), module_ns)
                outcome = {"status": "ok"}
            except BaseException as exc:  # noqa: BLE001
                outcome = failure(exc)
        emit({"ev": "result", "t": i, **outcome})
    emit({"ev": "done"})
    _exit(0)


if __name__ == "__main__":
    main()
