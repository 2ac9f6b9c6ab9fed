"""Text normalization shared by dedup and decontamination: reformatted copies normalize alike."""

from __future__ import annotations

import hashlib
import re

_LATEX_NOISE = re.compile(r"\\(?:left|right|displaystyle|textstyle|mathrm|mathbf|text|textbf|operatorname|quad|qquad|[,;:! ])")
_NON_WORD = re.compile(r"[^0-9a-z]+")


def normalize_text(text: str) -> str:
    """Lower-case; drop LaTeX formatting commands, math delimiters and punctuation; collapse spaces.

    ``Find $\\dfrac{1}{2}$  of 10.`` and ``find \\frac{1}{2} of 10`` both become ``find frac 1 2 of 10``.
    """
    text = text.lower().replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = _LATEX_NOISE.sub(" ", text)
    return _NON_WORD.sub(" ", text).strip()


def text_key(text: str) -> str:
    return hashlib.sha1(normalize_text(text).encode()).hexdigest()


def word_ngrams(normalized: str, n: int) -> set[tuple[str, ...]]:
    """Word n-grams of normalized text; a text shorter than n is one n-gram of all its words."""
    words = normalized.split()
    if len(words) <= n:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}
