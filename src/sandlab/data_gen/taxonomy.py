"""Branch taxonomies that drive seedless generation (data_gen/taxonomies/*.yaml)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from sandlab.errors import ConfigError


@dataclass(frozen=True)
class TopicDraw:
    primary: str
    topic: str
    secondary: str


@dataclass
class Taxonomy:
    domain: str
    branches: dict[str, list[str]]
    weights: dict[str, float]

    @classmethod
    def load(cls, path: str | Path) -> Taxonomy:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"taxonomy file {path} does not exist; set data.generate.taxonomy to a YAML under data_gen/taxonomies/")
        raw = yaml.safe_load(path.read_text()) or {}
        branches = raw.get("branches") or {}
        if len(branches) < 2:
            raise ConfigError(f"taxonomy {path} needs at least two branches (primary and secondary are distinct)")
        return cls(domain=raw.get("domain", path.stem), branches=branches, weights=raw.get("weights") or {})

    def draw(self, rng: random.Random) -> TopicDraw:
        names = list(self.branches)
        weights = [float(self.weights.get(n, 1.0)) for n in names]
        primary = rng.choices(names, weights=weights)[0]
        secondary = rng.choice([n for n in names if n != primary])
        topic = rng.choice(self.branches[primary] or [primary])
        return TopicDraw(primary, topic, secondary)
