"""Shared grader: answer extraction, math equivalence (math-verify) and time-limited grading."""

from sandlab.config import AnswerRule
from sandlab.grading.extract import (
    all_boxed,
    answer_set,
    extract_answer,
    extract_choice,
    extract_math_answer,
    last_boxed,
    strip_reasoning,
)
from sandlab.grading.math_equiv import math_equal
from sandlab.grading.pool import GradingPool, grade
from sandlab.grading.types import GradeItem, GradeResult

__all__ = [
    "AnswerRule",
    "GradeItem",
    "GradeResult",
    "GradingPool",
    "all_boxed",
    "answer_set",
    "extract_answer",
    "extract_choice",
    "extract_math_answer",
    "grade",
    "last_boxed",
    "math_equal",
    "strip_reasoning",
]
