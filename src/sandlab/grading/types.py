"""Items and results exchanged with the grader."""

from __future__ import annotations

from dataclasses import dataclass

from sandlab.config import AnswerRule

KINDS = ("math", "mcq")
ANSWER_RULES = tuple(str(r) for r in AnswerRule)

# GradeResult.reason values: how the verdict was reached.
NO_ANSWER = "no_answer"  # nothing extractable in the final part of the response
STRING_MATCH = "string_match"  # equal after textual normalisation (decided without math-verify)
NUMBER_MATCH = "number_match"  # both plain numbers, compared exactly where math-verify would (no math-verify)
MATH_VERIFY = "math_verify"  # decided by math-verify (correct or not)
CHOICE = "choice"  # multiple-choice letter compared with the gold letter
TIMEOUT = "timeout"  # the hard per-item limit ran out; the worker was killed
ERROR = "error"  # the grader raised or its worker died; counted incorrect


@dataclass(frozen=True)
class GradeItem:
    """One response to grade against a gold answer; ``kind`` is ``"math"`` or ``"mcq"``.

    ``rule`` says how a math response that boxes several answers is read: ``multi`` (the default)
    compares the set of its distinct boxes with the gold as a set; ``last_box`` reads only the last
    box (the paper protocol). A response with one box grades the same under both.
    """

    response: str
    gold: str
    kind: str = "math"
    rule: AnswerRule = AnswerRule.multi


@dataclass(frozen=True)
class GradeResult:
    """Extracted prediction, verdict, and how the verdict was reached (see the reason constants)."""

    pred: str | None
    correct: bool
    reason: str
