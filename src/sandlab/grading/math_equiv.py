"""Math answer equivalence: a string fast path, plain numbers compared exactly, then math-verify.

math-verify does the real work (LaTeX -> sympy, numeric/symbolic/set/interval comparison). This
module only (1) feeds it already-extracted answers, because its own extraction does not prefer the
last ``\\boxed{}``, and (2) chooses its timeouts: they are built on ``signal.alarm``, which only
works on the main thread, so off the main thread they are disabled and the hard limit is the
caller's job (see ``sandlab.grading.pool``).
"""

from __future__ import annotations

import logging
import re
import threading
from fractions import Fraction
from functools import lru_cache
from typing import Any

__all__ = ["math_equal", "fast_equal", "normalize_answer", "numeric_verdict", "strip_assignment", "warm_up"]

_SPACING = re.compile(r"\\[!,;:]|\\ |\\(?:left|right)(?![A-Za-z])|\\displaystyle(?![A-Za-z])|\s+")
_ASSIGNMENT = re.compile(r"\s*(?:[A-Za-z]|\\[A-Za-z]+)\s*=\s*(.+)", re.DOTALL)


def normalize_answer(answer: str) -> str:
    """Purely textual normalisation used for the fast path (no maths is interpreted)."""
    answer = re.sub(r"(?<!\\)\$", "", answer)
    answer = _SPACING.sub("", answer)
    answer = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", answer)
    return answer.rstrip(".")


def fast_equal(gold: str, pred: str | None) -> bool:
    """True when ``pred`` equals ``gold`` after textual normalisation (cheap, never hangs)."""
    if pred is None:
        return False
    pred = strip_assignment(gold, pred)
    norm = normalize_answer(gold)
    return bool(norm) and norm == normalize_answer(pred)


# Plain numbers: integers (up to 15 digits, no leading zeros), decimals, \frac{p}{q} and p/q of such integers.
_INT = r"-?(?:0|[1-9][0-9]{0,14})"
_DEN = r"[1-9][0-9]{0,14}"
_NUMBER = re.compile(
    rf"(?P<int>{_INT})|(?P<dec>-?[0-9]{{1,15}}\.[0-9]{{1,15}})"
    rf"|(?P<sign>-?)\\frac\{{(?P<fn>{_INT})\}}\{{(?P<fd>{_DEN})\}}|(?P<sn>{_INT})/(?P<sd>{_DEN})"
)


def _plain_number(answer: str) -> tuple[Fraction, bool] | None:
    """(value, exact) of a plain number; ``exact`` is False for decimals (math-verify rounds floats)."""
    m = _NUMBER.fullmatch(normalize_answer(answer))
    if m is None:
        return None
    if m["int"] is not None:
        return Fraction(int(m["int"])), True
    if m["dec"] is not None:
        return Fraction(m["dec"]), False
    if m["fn"] is not None:
        value = Fraction(int(m["fn"]), int(m["fd"]))
        return (-value if m["sign"] else value), True
    return Fraction(int(m["sn"]), int(m["sd"])), True


def numeric_verdict(gold: str, pred: str | None) -> bool | None:
    """math-verify's verdict where both answers are plain numbers and it is certain, else None.

    Equal values are equivalent for math-verify whatever their forms (``2`` = ``2.0`` = ``\frac{4}{2}``);
    different integers and fractions are not (it compares rationals exactly). Different values where a
    decimal takes part go to math-verify, which rounds floats (``0.333333`` = ``1/3``).
    tests/test_grading.py checks this against math-verify itself."""
    if pred is None:
        return None
    a, b = _plain_number(gold), _plain_number(strip_assignment(gold, pred))
    if a is None or b is None:
        return None
    if a[0] == b[0]:
        return True
    return False if a[1] and b[1] else None


def strip_assignment(gold: str, pred: str) -> str:
    """``x = 5`` -> ``5`` when the gold answer is not itself an equation."""
    if "=" in gold or pred.count("=") != 1:
        return pred
    m = _ASSIGNMENT.fullmatch(pred)
    return m.group(1).strip() if m else pred


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once that its timeouts are off; we disable them on purpose off the main
    thread, where the process-level limit of ``GradingPool`` is the real guard."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


@lru_cache(maxsize=1)
def _math_verify() -> Any:
    """Import math-verify lazily: it pulls in sympy (~1 s), which pure-extraction users don't need."""
    import math_verify

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropTimeoutDisabledWarning())
    return math_verify


def warm_up() -> None:
    """Import sympy and build math-verify's LaTeX parser and comparison now, not on the first real item.

    Calls math-verify directly: ``math_equal`` decides plain numbers without it, so a warm-up through
    ``math_equal`` would leave about 0.4 s of start-up for the first answer that needs maths."""
    mv = _math_verify()
    # A power, a polynomial identity, degrees and a set: sympy imports parts of itself on first use.
    for gold, pred in (("\\sqrt{2}", "2^{1/2}"), ("x^2+2x+1", "(x+1)^2"), ("30^\\circ", "\\frac{\\pi}{6}"), ("\\{1,2\\}", "\\{2,1\\}")):
        mv.verify(_parse(gold, None), _parse(pred, None))


_PLAIN_INTEGER = re.compile(r"-?[0-9]{1,15}")


def _parse(answer: str, timeout: int | None) -> list[Any]:
    """Parse an extracted answer with math-verify's LaTeX and plain-expression extractors."""
    mv = _math_verify()
    body = re.sub(r"(?<!\\)\$", "", answer).strip()
    if _PLAIN_INTEGER.fullmatch(body):
        # What math-verify's parse returns for an integer (tests/test_grading.py), without running its
        # LaTeX parser, which costs about 15 ms per answer.
        from sympy import Integer  # noqa: PLC0415

        return [Integer(int(body)), body]
    config = [mv.LatexExtractionConfig(), mv.ExprExtractionConfig()]
    parsed: list[Any] = []
    # "$...$" parses a few forms that "\boxed{...}" does not (e.g. "10\%", "3.") and vice versa
    # for others, so try the second wrapper only when the first gives no sympy object.
    for wrapped in (f"${body}$", f"\\boxed{{{body}}}"):
        parsed = mv.parse(wrapped, extraction_config=config, parsing_timeout=timeout)
        if any(not isinstance(p, str) for p in parsed):
            break
    return parsed


# Parsed gold answers, per (gold, timeout). One gold is compared with many predictions (k samples
# per problem in GRPO and agreement clustering), and parsing it is as costly as parsing the
# prediction. Only non-empty parses are kept, so a parse that timed out is retried next time.
_GOLD_CACHE: dict[tuple[str, int | None], list[Any]] = {}
_GOLD_CACHE_MAX = 4096


def _parse_gold(gold: str, timeout: int | None) -> list[Any]:
    key = (gold, timeout)
    parsed = _GOLD_CACHE.get(key)
    if parsed is None:
        parsed = _parse(gold, timeout)
        if parsed:
            if len(_GOLD_CACHE) >= _GOLD_CACHE_MAX:
                _GOLD_CACHE.clear()
            _GOLD_CACHE[key] = parsed
    return parsed


def math_equal(gold: str, pred: str | None, timeout_s: float | None = 5) -> bool:
    """Whether the extracted answer ``pred`` is mathematically equivalent to ``gold``.

    ``timeout_s`` is math-verify's own per-step limit (whole seconds, signal based); it only applies
    on the main thread and cannot interrupt C-level work such as huge integer powers, so callers
    that need a hard limit should go through ``GradingPool``.
    """
    if pred is None or not pred.strip():
        return False
    pred = strip_assignment(gold, pred)
    if fast_equal(gold, pred):
        return True
    if (verdict := numeric_verdict(gold, pred)) is not None:
        return verdict
    on_main = threading.current_thread() is threading.main_thread()
    timeout = max(1, int(timeout_s)) if (timeout_s and on_main) else None
    gold_parsed = _parse_gold(gold, timeout)
    pred_parsed = _parse(pred, timeout)
    if not gold_parsed or not pred_parsed:
        return False
    # Argument order matters: math-verify treats the first argument as the reference.
    return bool(_math_verify().verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
