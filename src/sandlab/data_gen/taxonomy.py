"""Taxonomies that drive seedless generation (data_gen/taxonomies/*.yaml).

Two or three levels, weights optional everywhere (default 1):

    domain: science
    branches:                       # branch (subject) -> topics
      physics: [quantum mechanics, optics]              # a list: topics drawn uniformly
      chemistry: {organic chemistry: 2, spectroscopy: 1}  # a mapping to numbers: topic weights
      writing: {emails: [formal request, apology]}      # a mapping to lists: topic -> tasks
    weights: {physics: 2}           # branch weights

SAND math uses branch -> topic (plus a random secondary branch); science MCQ uses weighted
subjects and branches; the LuminaSFT-style general mode uses domain -> topic -> task.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sandlab.errors import ConfigError


@dataclass(frozen=True)
class TopicDraw:
    primary: str
    topic: str
    secondary: str
    task: str = ""


@dataclass
class Taxonomy:
    domain: str
    # branch -> topic -> (weight, tasks)
    branches: dict[str, dict[str, tuple[float, list[str]]]]
    weights: dict[str, float]

    @classmethod
    def load(cls, path: str | Path, what: str = "data.generate.taxonomy") -> Taxonomy:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{what}: taxonomy file {path} does not exist; use a YAML under data_gen/taxonomies/")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"taxonomy {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
        branches = raw.get("branches") or {}
        if not isinstance(branches, dict) or len(branches) < 2:
            raise ConfigError(f"taxonomy {path} needs at least two branches (primary and secondary are distinct)")
        parsed = {str(name): _topics(path, str(name), topics) for name, topics in branches.items()}
        weights = {str(k): float(v) for k, v in (raw.get("weights") or {}).items()}
        unknown = sorted(set(weights) - set(parsed))
        if unknown:
            raise ConfigError(f"taxonomy {path}: weights name unknown branches {unknown}")
        return cls(domain=str(raw.get("domain", path.stem)), branches=parsed, weights=weights)

    def draw(self, rng: random.Random) -> TopicDraw:
        names = list(self.branches)
        primary = rng.choices(names, weights=[self.weights.get(n, 1.0) for n in names])[0]
        secondary = rng.choice([n for n in names if n != primary])
        topics = self.branches[primary]
        topic = rng.choices(list(topics), weights=[w for w, _ in topics.values()])[0]
        tasks = topics[topic][1]
        return TopicDraw(primary, topic, secondary, rng.choice(tasks) if tasks else "")


def _name(path: Path, value: Any, where: str) -> str:
    """A topic or task name; an empty one is a leaf nothing can be drawn for."""
    if value is None or not str(value).strip():
        raise ConfigError(f"taxonomy {path}: empty leaf under {where}; name it or remove it")
    return str(value)


def _topics(path: Path, branch: str, topics: Any) -> dict[str, tuple[float, list[str]]]:
    if topics is None or (isinstance(topics, (list, dict)) and not topics):
        raise ConfigError(f"taxonomy {path}: empty leaf {branch!r} (a branch without topics); give it topics or remove it")
    if isinstance(topics, list):
        return {_name(path, t, branch): (1.0, []) for t in topics}
    if isinstance(topics, dict):
        out = {}
        for topic, value in topics.items():
            topic = _name(path, topic, branch)
            if isinstance(value, bool) or value is None or value == []:
                raise ConfigError(f"taxonomy {path}: empty leaf {branch}/{topic} (no weight or tasks); give it a positive weight or a list of tasks")
            if isinstance(value, (int, float)) and value > 0:
                out[topic] = (float(value), [])
            elif isinstance(value, list):
                out[topic] = (1.0, [_name(path, t, f"{branch}/{topic}") for t in value])
            else:
                raise ConfigError(f"taxonomy {path}: {branch}/{topic} must be a positive weight or a list of tasks")
        return out
    raise ConfigError(f"taxonomy {path}: branch {branch!r} must map to a list or a mapping of topics")
