"""Test cases of the public code datasets, normalized to ``TestCase`` for the verifier.

``normalize_tests(raw, fn_name)`` reads every format sandlab meets and returns the tests plus the
function to call (None for stdin problems):

* LiveCodeBench ``code_generation_lite``: lists of ``{input, output, testtype: stdin|functional}``
  (``public_test_cases`` as JSON, ``private_test_cases`` as base64(zlib(pickle(JSON))), see
  ``decode_lcb_private``), or the whole row, whose ``metadata`` names ``func_name``;
* open-r1 ``verification_info``: ``{language: python, test_cases: [{input, output, type:
  stdin_stdout|function_call, fn_name?}]}``;
* APPS / TACO ``input_output`` and AM-DeepSeek-R1-Distilled ``info.test_case``: ``{inputs, outputs,
  fn_name?}``; call-based inputs are argument lists (one JSON argument a line), their outputs are
  compared with ``unwrap`` (APPS wraps return values in a one-element list), stdin inputs/outputs
  given as lists of lines are joined with newlines;
* sandlab's own: lists of ``{input, output, testtype, unwrap?}``.

Any of them may arrive as a JSON string. A malformed test is one ConfigError line naming ``where``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import pickle
import re
import zlib
from typing import Any

from sandlab.errors import ConfigError
from sandlab.verification.types import FUNCTIONAL, PROGRAM, STDIN, TEST_TYPES, TestCase

OPENR1_TYPES = {"stdin_stdout": STDIN, "function_call": FUNCTIONAL}
LCB_ROW_KEYS = ("public_test_cases", "private_test_cases")
BASE64_RE = re.compile(r"[A-Za-z0-9+/]+={0,2}")


class _PlainUnpickler(pickle.Unpickler):
    """Loads plain values only: every global (class, function) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def decode_lcb_private(s: str, *, where: str = "record") -> list[dict[str, Any]]:
    """LiveCodeBench's ``private_test_cases``: plain JSON, or base64 -> zlib -> pickle -> a JSON
    string of ``[{input, output, testtype}]``. This unpickles dataset content, as LiveCodeBench's own
    loader does; the unpickler here refuses every global, so only the plain string it holds can load."""
    if not isinstance(s, str):
        raise ConfigError(f"{where}: private_test_cases must be a string, got {type(s).__name__}")
    if not s.strip():
        return []
    try:
        return _json_list(json.loads(s), where, "private_test_cases")
    except json.JSONDecodeError:
        pass
    try:
        text = _PlainUnpickler(io.BytesIO(zlib.decompress(base64.b64decode(s.encode("utf-8"), validate=True)))).load()
        return _json_list(json.loads(text), where, "private_test_cases")
    except (binascii.Error, zlib.error, pickle.UnpicklingError, EOFError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: private_test_cases is neither JSON nor base64(zlib(pickle(JSON))) ({type(exc).__name__})") from None


def encode_lcb_private(tests: list[dict[str, Any]]) -> str:
    """The inverse of ``decode_lcb_private`` (fixtures, round trips)."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode("utf-8")


def _json_list(value: Any, where: str, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: {what} must be a list of tests, got {type(value).__name__}")
    return value


def _loads(raw: Any, where: str, what: str = "tests") -> Any:
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        if what == "tests" and BASE64_RE.fullmatch(raw.strip()):  # a LiveCodeBench private_test_cases string
            return decode_lcb_private(raw, where=where)
        raise ConfigError(f"{where}: {what} are not valid JSON ({exc.msg} at char {exc.pos})") from None


def _lines(value: Any, where: str, what: str) -> str:
    """A stdin input or expected stdout: a string, a number, or a list of lines (joined with newlines)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
        return "\n".join(str(v) for v in value)
    raise ConfigError(f"{where}: {what} must be text or a list of lines, got {type(value).__name__}")


def _dumps(value: Any, where: str, what: str) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {what} is not JSON-serialisable ({type(value).__name__})") from None


def _json_text(value: Any, where: str, what: str) -> str:
    """An expected value as JSON text; a string is taken to be JSON already and must parse."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except json.JSONDecodeError:
            raise ConfigError(f"{where}: {what} {value[:60]!r} is not JSON") from None
        return value
    return _dumps(value, where, what)


def _arguments(value: Any, where: str, what: str) -> str:
    """Call arguments: newline-separated JSON (as LiveCodeBench writes them) or a list of arguments."""
    if isinstance(value, list):
        return "\n".join(_dumps(a, where, what) for a in value)
    if isinstance(value, str):
        for n, line in enumerate(value.split("\n"), start=1):
            try:
                json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(f"{where}: {what} line {n} {line[:60]!r} is not a JSON argument") from None
        return value
    raise ConfigError(f"{where}: {what} must be newline-separated JSON arguments or a list of them, got {type(value).__name__}")


def _from_inputs_outputs(raw: dict[str, Any], fn_name: str | None, where: str) -> list[TestCase]:
    """APPS / TACO / AM ``{inputs, outputs, fn_name?}``."""
    inputs, outputs = raw.get("inputs"), raw.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list):
        raise ConfigError(f"{where}: inputs and outputs must be lists")
    if len(inputs) != len(outputs):
        raise ConfigError(f"{where}: {len(inputs)} inputs but {len(outputs)} outputs")
    tests = []
    for n, (given, want) in enumerate(zip(inputs, outputs), start=1):
        if fn_name:
            if not isinstance(given, list):
                raise ConfigError(f"{where}: call-based input {n} must be a list of arguments, got {type(given).__name__}")
            args = "\n".join(_dumps(a, where, f"input {n}") for a in given)
            tests.append(TestCase(args, _dumps(want, where, f"output {n}"), FUNCTIONAL, unwrap=True))
        else:
            tests.append(TestCase(_lines(given, where, f"input {n}"), _lines(want, where, f"output {n}"), STDIN))
    return tests


def _from_list(items: list[Any], fn_name: str | None, where: str) -> tuple[list[TestCase], set[str]]:
    """LiveCodeBench / sandlab ``{input, output, testtype}`` and open-r1 ``{input, output, type, fn_name?}``
    lists; returns the tests and the function names the tests themselves name."""
    tests, names = [], set()
    for n, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: test {n} must be an object with input/output, got {type(item).__name__}")
        if "input" not in item:
            raise ConfigError(f"{where}: test {n} has no input")
        unwrap = bool(item.get("unwrap", False))
        if "type" in item and "testtype" not in item:  # open-r1
            kind = OPENR1_TYPES.get(item["type"])
            if kind is None:
                raise ConfigError(f"{where}: test {n} has type {item['type']!r}, not one of {', '.join(OPENR1_TYPES)}")
            unwrap = unwrap or kind == FUNCTIONAL  # its call-based tests come from TACO/APPS, whose values may be wrapped
        else:
            kind = item.get("testtype", FUNCTIONAL if fn_name else STDIN)
            if kind not in TEST_TYPES:
                raise ConfigError(f"{where}: test {n} has testtype {kind!r}, not one of {', '.join(TEST_TYPES)}")
        if item.get("fn_name"):
            names.add(str(item["fn_name"]))
        if kind == FUNCTIONAL:
            tests.append(TestCase(_arguments(item["input"], where, f"test {n} input"), _json_text(item.get("output"), where, f"test {n} output"), FUNCTIONAL, unwrap))
        elif kind == PROGRAM:
            if not isinstance(item["input"], str):
                raise ConfigError(f"{where}: program test {n} must be code text")
            tests.append(TestCase(item["input"], "", PROGRAM))
        else:
            tests.append(TestCase(_lines(item["input"], where, f"test {n} input"), _lines(item.get("output", ""), where, f"test {n} output"), STDIN))
    return tests, names


def _lcb_row(row: dict[str, Any], where: str) -> tuple[list[Any], str | None]:
    public = _json_list(_loads(row.get("public_test_cases") or "[]", where, "public_test_cases"), where, "public_test_cases")
    private = row.get("private_test_cases") or ""
    private = decode_lcb_private(private, where=where) if isinstance(private, str) else _json_list(private, where, "private_test_cases")
    metadata = _loads(row.get("metadata") or "{}", where, "metadata")
    name = metadata.get("func_name") if isinstance(metadata, dict) else None
    return [*public, *private], name


def normalize_tests(raw: Any, fn_name: str | None = None, *, where: str = "record") -> tuple[list[TestCase], str | None]:
    """(tests, function name or None) of any supported test format (see the module doc)."""
    raw = _loads(raw, where)
    names: set[str] = set()
    if isinstance(raw, dict) and any(k in raw for k in LCB_ROW_KEYS):
        raw, name = _lcb_row(raw, where)
        names |= {name} if name else set()
    if isinstance(raw, dict) and "test_cases" in raw:  # open-r1 verification_info
        language = raw.get("language", "python")
        if str(language).lower() not in ("python", "python3"):
            raise ConfigError(f"{where}: tests are for language {language!r}, not python")
        raw = _loads(raw["test_cases"], where, "test_cases")
    if isinstance(raw, dict) and ("inputs" in raw or "outputs" in raw):
        own = raw.get("fn_name")
        if own and fn_name and own != fn_name:
            raise ConfigError(f"{where}: the tests call {own!r} but the problem names {fn_name!r}")
        name = own or fn_name
        tests = _from_inputs_outputs(raw, name, where)
        names |= {name} if name else set()
    elif isinstance(raw, list):
        tests, named = _from_list(raw, fn_name or next(iter(names), None), where)
        names |= named
    elif raw in (None, ""):
        raise ConfigError(f"{where}: has no tests")
    else:
        raise ConfigError(f"{where}: unknown test format ({type(raw).__name__}{' with keys ' + str(sorted(raw))[:120] if isinstance(raw, dict) else ''})")
    if not tests:
        raise ConfigError(f"{where}: has no tests")
    if fn_name:
        names.add(fn_name)
    if len(names) > 1:
        raise ConfigError(f"{where}: the tests name several functions {sorted(names)}")
    functional = any(t.testtype == FUNCTIONAL for t in tests)
    if functional and not names:
        raise ConfigError(f"{where}: functional tests but no function name (fn_name / metadata.func_name)")
    if functional and any(t.testtype == STDIN for t in tests):
        raise ConfigError(f"{where}: mixes stdin and functional tests")
    return tests, (next(iter(names)) if functional else None)


def tests_to_dicts(tests: list[TestCase]) -> list[dict[str, Any]]:
    """The ``tests`` field of a code record (JSON lines): ``{input, output, testtype, unwrap}`` each."""
    return [{"input": t.input, "output": t.output, "testtype": t.testtype, "unwrap": t.unwrap} for t in tests]
