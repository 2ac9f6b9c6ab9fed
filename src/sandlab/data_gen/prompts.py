"""Prompt templates of the data stages (data_gen/prompts/*.txt), checked when loaded."""

from __future__ import annotations

from pathlib import Path

from sandlab.errors import ConfigError


def load_prompt(path: Path, what: str, **fields: str) -> str:
    """Read a prompt template and check that it formats with ``fields`` (literal braces are doubled)."""
    if not path.is_file():
        raise ConfigError(f"{what}: prompt file {path} does not exist")
    template = path.read_text()
    try:
        template.format(**fields)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"{what}: prompt {path} does not format ({type(exc).__name__}: {exc}); it may use {sorted(fields)}, write literal braces as {{{{ }}}}") from None
    return template
