"""Answer extraction from model responses (math answers and multiple-choice letters).

Everything here works on the *final* part of a response: reasoning inside ``<think>`` is what
the model was considering, not what it answered, so it is dropped before any extraction.

Answer rules (``AnswerRule``, math answers only): ``last_box`` reads the last box, as AMD's grader
does (the paper protocol). ``multi`` reads every box of the final part: one distinct answer is read
as under ``last_box``; several distinct ones (``\\boxed{(1, 2)}, \\boxed{(2, 1)}``,
``\\boxed{6} \\text{ and } \\boxed{8}``) become one set ``\\{a, b\\}``, which math-verify compares
with the gold as a set. So does a "Final answer" statement with several math spans (``$6$ and $8$``).
"""

from __future__ import annotations

import re

from sandlab.config import AnswerRule
from sandlab.grading.math_equiv import normalize_answer

__all__ = ["strip_reasoning", "last_boxed", "all_boxed", "answer_set", "extract_math_answer", "extract_choice"]

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_THINK_OPEN = re.compile(r"<think>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)
_BOX_TOKEN = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
# "Final answer: X", "The final answer is X", "Final Answer: The final answer is X. I hope it is correct."
# Markdown bold is common around both the phrase and the answer: "**Final Answer:** **5**".
_FINAL_LINE = re.compile(r"final\s+answer\**(?:\s+is\b|\s*:)[ \t*]*:?[ \t]*([^\n]*)", re.IGNORECASE)
_FINAL_START = re.compile(r"final\s+answer", re.IGNORECASE)
_HOPE_SUFFIX = re.compile(r"\s*I hope it is correct\.?\s*$", re.IGNORECASE)
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textrm)\s*\{([^{}]*)\}")
_MATH_SPAN = re.compile(r"(?<!\\)\$(.+?)(?<!\\)\$", re.DOTALL)
# A number with thousands separators: 10,455 or 10{,}455 (LaTeX), 1,234,567.5.
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:(?:,|\{,\})\d{3})+(?:\.\d+)?")


def strip_reasoning(text: str) -> str:
    """Return the final-answer part of ``text``, without any ``<think>`` reasoning.

    Complete ``<think>...</think>`` blocks are removed; a stray ``</think>`` (chat templates that
    open the block themselves, DeepSeek-R1 style) keeps only what follows the last one; an unclosed
    ``<think>`` (generation truncated mid-thought) drops everything from it on.
    """
    text = _THINK_BLOCK.sub("", text)
    closes = list(_THINK_CLOSE.finditer(text))
    if closes:
        text = text[closes[-1].end() :]
    opened = _THINK_OPEN.search(text)
    if opened:
        text = text[: opened.start()]
    return text.strip()


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """Content of the brace group opening at ``text[start] == '{'`` and the index after it.

    Backslash-escaped characters (``\\{``, ``\\}``) do not count as group delimiters.
    Returns None when the group is never closed (e.g. a truncated response).
    """
    end = _brace_pairs(text[start:]).get(0)
    return None if end is None else (text[start + 1 : start + end - 1], start + end)


def _brace_pairs(text: str) -> dict[int, int]:
    """For every ``{`` of ``text`` that is closed: its index -> the index after its ``}``.

    One pass, with the escapes of ``_braced``: the same groups as ``_braced`` finds from each ``{``
    that does not follow a backslash (a box's ``{`` never does), without rescanning the text per box.
    """
    pairs: dict[int, int] = {}
    opened: list[int] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            opened.append(i)
        elif ch == "}" and opened:
            pairs[opened.pop()] = i + 1
        i += 1
    return pairs


def _boxed_span(text: str, match: re.Match[str], pairs: dict[int, int] | None = None) -> tuple[str, int] | None:
    """(content, index after it) of the ``\\boxed``/``\\fbox`` starting at ``match``, or None if malformed.
    ``pairs`` (``_brace_pairs(text)``) saves rescanning when many boxes are read from one text."""
    i = match.end()
    j = i
    while j < len(text) and text[j] in " \t":
        j += 1
    if j < len(text) and text[j] == "{":
        if pairs is None:
            return _braced(text, j)
        end = pairs.get(j)
        return (text[j + 1 : end - 1], end) if end is not None else None
    if j > i:  # "\boxed 5": the argument is the next token
        token = re.match(r"[^\s$]+", text[j:])
        if token:
            return token.group(0).rstrip(".,;"), j + token.end()
    return None


def _boxed_at(text: str, match: re.Match[str]) -> str | None:
    """Content of the ``\\boxed``/``\\fbox`` starting at ``match``, or None if malformed."""
    span = _boxed_span(text, match)
    return span[0] if span else None


def _last_boxed_match(text: str) -> tuple[str, int] | None:
    """(content, start index) of the last well-formed boxed expression."""
    pairs: dict[int, int] | None = None
    for k, match in enumerate(reversed(list(_BOX_TOKEN.finditer(text)))):
        if k == 1:  # the last box is malformed (e.g. truncated): index the braces once
            pairs = _brace_pairs(text)
        found = _boxed_span(text, match, pairs)
        if found is not None:
            return found[0], match.start()
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed X`` in ``text``."""
    found = _last_boxed_match(text)
    return found[0] if found else None


def all_boxed(text: str) -> list[str]:
    """Contents of every well-formed box in ``text``, in order. A box that holds another box gives
    way to it (``\\boxed{\\boxed{5}}`` is ``5``, as ``last_boxed`` reads it)."""
    spans: list[tuple[int, int, str]] = []
    pairs = _brace_pairs(text) if "{" in text else {}
    for match in _BOX_TOKEN.finditer(text):
        found = _boxed_span(text, match, pairs)
        if found is not None:
            spans.append((match.start(), found[1], found[0]))
    # Boxes nest like their braces, so a box holds another exactly when the next one starts inside it.
    return [c for k, (_, end, c) in enumerate(spans) if k + 1 == len(spans) or spans[k + 1][0] >= end]


def answer_set(answers: list[str]) -> str | None:
    """One answer from several: None for none, the answer itself when all are textually the same
    (after the fast path's normalisation), else the set ``\\{a, b\\}`` of the distinct ones, where
    numbers lose their thousands separators (``10,455`` -> ``10455``, not the two elements 10 and 455).

    The elements are sorted by their normalised text, so the same answers in another order give the
    same string (majority votes and agreement clusters count them together)."""
    distinct: dict[str, str] = {}
    for answer in answers:
        if answer:
            distinct.setdefault(normalize_answer(answer), answer)
    if len(distinct) > 1:
        # In a set, "10,455" would read as two elements: write such numbers without separators.
        plain = [re.sub(r"\{,\}|,", "", a) if _THOUSANDS.fullmatch(normalize_answer(a)) else a for a in distinct.values()]
        distinct = {}
        for answer in plain:
            distinct.setdefault(normalize_answer(answer), answer)
    if not distinct:
        return None
    if len(distinct) == 1:
        return next(iter(distinct.values()))
    return "\\{" + ", ".join(distinct[k] for k in sorted(distinct)) + "\\}"


def _clean(answer: str) -> str:
    """Strip math delimiters, whitespace and sentence punctuation around an answer."""
    answer = answer.strip()
    for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
        if answer.startswith(left) and answer.endswith(right):
            answer = answer[len(left) : -len(right)]
    # '$' only delimits math mode; an escaped \$ (currency) is kept.
    answer = re.sub(r"(?<!\\)\$", "", answer).strip()
    return answer.rstrip(".").strip()


def extract_math_answer(response: str, rule: AnswerRule | str = AnswerRule.last_box) -> str | None:
    """The final math answer in ``response``, or None when the final part states none.

    Priority: boxed expressions (the last one under ``rule`` ``last_box``; all of them, as a set when
    they differ, under ``multi``), then the last ``<answer>`` tag, then the last
    "Final answer: ..." / "The final answer is ..." statement.
    """
    rule = AnswerRule(rule)
    final = strip_reasoning(response)
    if not final:
        return None
    if rule == AnswerRule.multi:
        boxed_set = answer_set([_clean(b) for b in all_boxed(final)])
        if boxed_set is not None:
            return boxed_set
    else:
        boxed = last_boxed(final)
        if boxed is not None and _clean(boxed):
            return _clean(boxed)
    tags = [_clean(t) for t in _ANSWER_TAG.findall(final)]
    tags = [t for t in tags if t]
    if tags:
        return tags[-1]
    # Scan statement starts from the end: "Final Answer: The final answer is 5" nests two of them,
    # and a plain finditer would hand back the outer one with the inner phrase in its answer.
    for start in reversed([m.start() for m in _FINAL_START.finditer(final)]):
        match = _FINAL_LINE.match(final, start)
        if match is None:
            continue
        answer = match.group(1)
        if not answer.strip():  # "Final answer:\n 42": the answer is on the next non-empty line
            rest = [ln for ln in final[match.end() :].splitlines() if ln.strip()]
            answer = rest[0] if rest else ""
        answer = _HOPE_SUFFIX.sub("", answer).strip().strip("*")
        spans = [_clean(m) for m in _MATH_SPAN.findall(answer)]
        if rule == AnswerRule.multi and len([m for m in spans if m]) > 1:  # "The final answer is $6$ and $8$."
            return answer_set(spans)
        answer = _clean(answer)
        if answer:
            return answer
    return None


def _letter_of(content: str, cls: str) -> str | None:
    """The option letter when ``content`` is just a letter, e.g. ``B``, ``(B)``, ``\\text{B}``, ``B) 42``."""
    content = _clean(content)
    for _ in range(2):  # \textbf{\text{B}} and similar nesting
        content = _TEXT_WRAPPER.sub(r"\1", content)
    content = content.strip().strip("*").strip()
    m = re.fullmatch(rf"[(\[]?\s*([{cls}])\s*[)\].:]?(?:\s.*)?", content, re.DOTALL | re.IGNORECASE)
    return m.group(1).upper() if m else None


def extract_choice(response: str, letters: str = "ABCD") -> str | None:
    """The multiple-choice letter the final part of ``response`` commits to (upper case), or None.

    Recognised: ``\\boxed{B}`` (also ``\\text{B}``, ``(B)`` inside), ``<answer>B</answer>``,
    "Answer: B", "the answer is (B)", "Final answer: B", and a response that is only ``B``/``(B)``/``B.``.
    When several are present, the last statement in the text wins.
    """
    letters = "".join(dict.fromkeys(letters.upper()))
    final = strip_reasoning(response)
    if not final or not letters:
        return None
    cls = re.escape(letters)
    candidates: list[tuple[int, str]] = []

    boxed = _last_boxed_match(final)
    if boxed is not None:
        letter = _letter_of(boxed[0], cls)
        if letter:
            candidates.append((boxed[1], letter))
    for tag in _ANSWER_TAG.finditer(final):
        letter = _letter_of(tag.group(1), cls)
        if letter:
            candidates.append((tag.start(), letter))
    # "Answer: B", "answer is (B)", "The correct answer is option **C**." The letter itself must be
    # upper case so that prose such as "the answer is a prime" is not read as option A.
    statement = re.compile(
        r"\banswer\b(?:\s+(?:is|would\s+be|should\s+be))?\s*:?\s*"
        r"(?:(?:option|choice)\s+)?[*$\s]*(?:\\text(?:bf)?\{)?[(\[]?"
        rf"(?-i:([{cls}]))"
        r"(?![A-Za-z0-9])",
        re.IGNORECASE,
    )
    for m in statement.finditer(final):
        candidates.append((m.start(), m.group(1)))
    if candidates:
        return max(candidates, key=lambda c: c[0])[1]
    # A response that is nothing but the letter: "B", "(B)", "B.", "**B**".
    bare = re.fullmatch(rf"[*\s]*[(\[]?([{cls}])[)\]]?\.?[*\s]*", final)
    return bare.group(1) if bare else None


def extract_answer(response: str, kind: str = "math", rule: AnswerRule | str = AnswerRule.last_box) -> str | None:
    """The final answer by answer kind: ``math`` (boxed/tagged/stated, read by ``rule``), ``mcq`` (a
    letter), ``open`` (open-ended tasks, which have none)."""
    if kind == "mcq":
        return extract_choice(response)
    if kind == "open":
        return None
    return extract_math_answer(response, rule)
