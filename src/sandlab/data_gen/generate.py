"""Seedless problem generation: taxonomy-driven prompts, tagged ``<Q>...</Q><S>...</S>`` outputs."""

from __future__ import annotations

import random
import re
from pathlib import Path

from sandlab.config import GenerationStage
from sandlab.data_gen.prompts import load_prompt
from sandlab.data_gen.taxonomy import Taxonomy
from sandlab.grading import extract_math_answer, strip_reasoning
from sandlab.inference.base import ChatBackend, sampling_from
from sandlab.records import Record, stable_id

QUESTION_RE = re.compile(r"<Q>(.*?)(?:</Q>|(?=<S>))", re.S)
SOLUTION_RE = re.compile(r"<S>(.*?)(?:</S>|$)", re.S)


def build_requests(cfg: GenerationStage, root: Path, seed: int) -> list[Record]:
    """One request per problem; ids depend on (domain, seed, index) so reruns regenerate the same ids."""
    taxonomy = Taxonomy.load(root / cfg.taxonomy)
    template = load_prompt(root / cfg.prompt, "data.generate.prompt", primary="", topic="", secondary="")
    rng = random.Random(seed)
    requests = []
    for index in range(cfg.num_problems):
        draw = taxonomy.draw(rng)
        requests.append({
            "id": stable_id(taxonomy.domain, seed, index),
            "domain": taxonomy.domain,
            "branch": draw.primary,
            "topic": draw.topic,
            "secondary_branch": draw.secondary,
            "prompt": template.format(primary=draw.primary, topic=draw.topic, secondary=draw.secondary),
        })
    return requests


def load_source_problems(cfg: GenerationStage) -> list[Record]:
    """Distillation mode: existing problems with reference answers from a JSONL file or a Hub dataset."""
    from sandlab.errors import ConfigError  # noqa: PLC0415
    from sandlab.models import looks_like_local_path  # noqa: PLC0415
    from sandlab.records import read_jsonl  # noqa: PLC0415

    source = cfg.source or ""
    if Path(source).is_file():
        rows = read_jsonl(source)
    elif looks_like_local_path(source):
        raise ConfigError(f"data.generate.source={source!r} does not exist; give a JSONL file or a Hub dataset id")
    else:
        try:
            import datasets  # noqa: PLC0415

            rows = list(datasets.load_dataset(source, split=cfg.source_split))
        except Exception as exc:  # noqa: BLE001 (offline, missing, gated: same advice)
            raise ConfigError(f"could not load data.generate.source={source!r} ({type(exc).__name__}); use a local JSONL file") from None
    records = []
    for i, row in enumerate(rows[: cfg.source_limit] if cfg.source_limit else rows):
        if cfg.problem_field not in row or cfg.answer_field not in row:
            raise ConfigError(f"data.generate.source row {i + 1} lacks {cfg.problem_field!r} or {cfg.answer_field!r}; set data.generate.problem_field/answer_field")
        problem = str(row[cfg.problem_field])
        records.append({
            "id": str(row.get("id") or stable_id("distill", problem)),
            "domain": cfg.domain,
            "problem": problem,
            "reference_answer": str(row[cfg.answer_field]),
            "reference_solution": None,
            "source_dataset": source,
        })
    return records


def parse_problem(text: str, *, reference_solution: bool = True) -> tuple[dict[str, str] | None, str | None]:
    """Return (fields, None) or (None, drop_reason) for one teacher output."""
    final = strip_reasoning(text)
    if not final.strip():
        return None, "empty_output"
    if not reference_solution:  # generation stopped at </Q>, which the backend strips
        final = final if "</Q>" in final else final + "</Q>"
    question = QUESTION_RE.search(final)
    if not question or not question.group(1).strip():
        return None, "missing_problem_tag"
    if not reference_solution:
        return {"problem": question.group(1).strip()}, None
    solution = SOLUTION_RE.search(final, question.end())
    if not solution or not solution.group(1).strip():
        return None, "missing_solution_tag"
    answer = extract_math_answer(solution.group(1))
    if not answer:
        return None, "missing_answer"
    return {"problem": question.group(1).strip(), "reference_solution": solution.group(1).strip(), "reference_answer": answer}, None


def generate_problems(
    backend: ChatBackend, requests: list[Record], cfg: GenerationStage, *, teacher: str, seed_offset: int = 0
) -> tuple[list[Record], list[Record]]:
    conversations = []
    for req in requests:
        conv = [{"role": "user", "content": req["prompt"]}]
        if cfg.response_prefix:
            conv.append({"role": "assistant", "content": cfg.response_prefix})
        conversations.append(conv)
    sampling = sampling_from(cfg.sampling, n=1, offset=seed_offset)
    outputs = backend.generate(conversations, sampling, desc="generate problems")
    kept, dropped = [], []
    for req, (completion,) in zip(requests, outputs):
        base = {k: v for k, v in req.items() if k != "prompt"}
        usage = {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens}
        if not completion.ok:
            dropped.append({**base, "reason": "teacher_error", "detail": completion.error})
            continue
        if completion.truncated:
            dropped.append({**base, "reason": "truncated", **usage})
            continue
        fields, reason = parse_problem(cfg.response_prefix + completion.text, reference_solution=cfg.reference_solution)
        if fields is None:
            dropped.append({**base, "reason": reason, "raw": completion.text[:2000], **usage})
            continue
        kept.append({**base, **fields, "teacher": teacher, "generation_usage": usage})
    return kept, dropped
