"""The code of a model response: its last fenced Python block (after the reasoning, if any)."""

from __future__ import annotations

import ast
import re

# ```python ... ``` (also ```py, ```python3 and a bare ```); an unterminated block (a response cut at
# the length limit) is not code.
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)```", re.S)
_PYTHON_TAGS = {"python", "py", "python3", "py3"}
_THINK_END = "</think>"


def _blocks(text: str) -> list[tuple[str, str]]:
    return [(lang.lower(), body) for lang, body in _FENCE.findall(text)]


def _plain_code(text: str) -> str | None:
    """Text without any fence counts as code when it parses and does more than name a value ("42",
    "yes"), so ``verify_code`` takes plain code as well as responses."""
    if "```" in text or not text.strip():
        return None
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return None
    trivial = all(isinstance(n, ast.Expr) and isinstance(n.value, (ast.Constant, ast.Name)) for n in tree.body)
    return None if trivial else text


def extract_code(response: str) -> str | None:
    """The last ```python block of ``response`` (a bare ``` block if none is tagged), looked for after
    ``</think>`` first so a draft inside the reasoning never wins over the answer; plain code is
    returned as is; None when there is no code."""
    text = response or ""
    candidates = [text.rsplit(_THINK_END, 1)[1], text] if _THINK_END in text else [text]
    for part in candidates:
        blocks = _blocks(part)
        tagged = [body for lang, body in blocks if lang in _PYTHON_TAGS]
        untagged = [body for lang, body in blocks if not lang]
        chosen = (tagged or untagged or [None])[-1]
        if chosen is not None and chosen.strip():
            return chosen
    return _plain_code(text)
