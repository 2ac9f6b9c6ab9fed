"""Answer extraction from model responses (math answers and multiple-choice letters).

Everything here works on the *final* part of a response: reasoning inside ``<think>`` is what
the model was considering, not what it answered, so it is dropped before any extraction.
"""

from __future__ import annotations

import re

__all__ = ["strip_reasoning", "last_boxed", "extract_math_answer", "extract_choice"]

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
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
        i += 1
    return None


def _boxed_at(text: str, match: re.Match[str]) -> str | None:
    """Content of the ``\\boxed``/``\\fbox`` starting at ``match``, or None if malformed."""
    i = match.end()
    j = i
    while j < len(text) and text[j] in " \t":
        j += 1
    if j < len(text) and text[j] == "{":
        group = _braced(text, j)
        return group[0] if group else None
    if j > i:  # "\boxed 5": the argument is the next token
        token = re.match(r"[^\s$]+", text[j:])
        if token:
            return token.group(0).rstrip(".,;")
    return None


def _last_boxed_match(text: str) -> tuple[str, int] | None:
    """(content, start index) of the last well-formed boxed expression."""
    for match in reversed(list(_BOX_TOKEN.finditer(text))):
        content = _boxed_at(text, match)
        if content is not None:
            return content, match.start()
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed X`` in ``text``."""
    found = _last_boxed_match(text)
    return found[0] if found else None


def _clean(answer: str) -> str:
    """Strip math delimiters, whitespace and sentence punctuation around an answer."""
    answer = answer.strip()
    for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
        if answer.startswith(left) and answer.endswith(right):
            answer = answer[len(left) : -len(right)]
    # '$' only delimits math mode; an escaped \$ (currency) is kept.
    answer = re.sub(r"(?<!\\)\$", "", answer).strip()
    return answer.rstrip(".").strip()


def extract_math_answer(response: str) -> str | None:
    """The final math answer in ``response``, or None when the final part states none.

    Priority: last boxed expression, then last ``<answer>`` tag, then the last
    "Final answer: ..." / "The final answer is ..." statement.
    """
    final = strip_reasoning(response)
    if not final:
        return None
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
        answer = _clean(_HOPE_SUFFIX.sub("", answer).strip().strip("*"))
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


def extract_answer(response: str, kind: str = "math") -> str | None:
    """The final answer by answer kind: ``math`` (boxed/tagged/stated), ``mcq`` (a letter), ``open``
    (open-ended tasks, which have none)."""
    if kind == "mcq":
        return extract_choice(response)
    if kind == "open":
        return None
    return extract_math_answer(response)
