"""Seedless generation from a taxonomy, in three styles (``data.generate.style``):

* ``math``: an AIME-level problem with a single numerical answer and a reference solution,
  ``<Q>problem</Q><S>solution ending in \\boxed{answer}</S>`` (SAND-Math);
* ``mcq``: a PhD qualifying-exam multiple-choice question,
  ``<Q>question</Q><CORRECT>..</CORRECT><WRONG>..</WRONG> x3 <S>explanation</S>``; the options are
  shuffled here (seeded by the record id) so the correct letter is uniform over A-D whatever the
  teacher's habits (SAND-MathScience, GPQA style);
* ``general``: one user request for a domain -> topic -> task draw, ``<Q>request</Q>``; the solve stage
  writes the response (LuminaSFT-style SFT data for small models).
"""

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
from sandlab.stages import Kind, Stage, StageContext

QUESTION_RE = re.compile(r"<Q>(.*?)(?:</Q>|(?=<S>|<CORRECT>))", re.S)
SOLUTION_RE = re.compile(r"<S>(.*?)(?:</S>|$)", re.S)
CORRECT_RE = re.compile(r"<CORRECT>(.*?)</CORRECT>", re.S)
WRONG_RE = re.compile(r"<WRONG>(.*?)</WRONG>", re.S)
STYLES = ("math", "mcq", "general")
LETTERS = "ABCD"
# How each style's answers are compared by the shared grader; general tasks have none.
ANSWER_KIND = {"math": "math", "mcq": "mcq", "general": "open"}
# What a code problem carries from its source to the solve and filter stages (data.agreement.mode=tests).
CODE_FIELDS = ("tests", "fn_name", "starter_code", "difficulty", "platform", "contest_date")


def build_requests(cfg: GenerationStage, root: Path, seed: int) -> list[Record]:
    """One request per problem; ids depend on (domain, seed, index) so reruns regenerate the same ids."""
    from sandlab.errors import ConfigError  # noqa: PLC0415

    if cfg.style not in STYLES:
        raise ConfigError(f"data.generate.style={cfg.style!r} is not one of {list(STYLES)}")
    taxonomy = Taxonomy.load(root / cfg.taxonomy)
    template = load_prompt(root / cfg.prompt, "data.generate.prompt", primary="", topic="", secondary="", task="", domain="")
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
            **({"task": draw.task} if draw.task else {}),
            "answer_kind": ANSWER_KIND[cfg.style],
            "prompt": template.format(primary=draw.primary, topic=draw.topic, secondary=draw.secondary, task=draw.task, domain=taxonomy.domain),
        })
    return requests


def load_source_problems(cfg: GenerationStage, *, keep_unreferenced: bool = False) -> list[Record]:
    """Distillation mode: existing problems with reference answers (or test cases) from a local file
    (.json/.jsonl/.jsonl.zst/.parquet) or a Hub dataset (``source_config``, ``source_split``). A known
    dataset format (``source_format``, auto-detected: SAND-MATH, AM-DeepSeek-R1-Distilled, OpenR1-Math,
    OpenThoughts, ...) is read by ``sandlab.readers``; any other rows (and sandlab's own SFT export) by
    ``problem_field`` / ``answer_field``. Rows without a problem or a reference are dropped, counted in the log.
    Code problems (LiveCodeBench, APPS/TACO, open-r1, AM rows with test cases) keep ``answer_kind: code``,
    their normalized ``tests`` and ``CODE_FIELDS``; ``source_filter`` keeps the records whose fields match.
    ``keep_unreferenced``: rows with neither a reference nor tests stay too (answer_kind ``general``), for a
    reward model to check (data.agreement.keep_unreferenced)."""
    import logging  # noqa: PLC0415

    from sandlab.errors import ConfigError  # noqa: PLC0415
    from sandlab.readers import GENERIC, READERS, detect_format, load_rows, matches, records_from_rows  # noqa: PLC0415

    log = logging.getLogger(__name__)
    source = cfg.source or ""
    try:
        rows = load_rows(source, cfg.source_config, cfg.source_split)
    except ConfigError as exc:
        raise ConfigError(f"data.generate.source: {exc}") from None
    if cfg.source_limit:
        rows = rows[: cfg.source_limit]
    fmt = str(cfg.source_format)
    first = rows[0] if rows and isinstance(rows[0], dict) else {}
    by_fields = cfg.answer_field in first and (cfg.problem_field in first or isinstance(first.get("prompt"), list))
    if fmt == "auto":
        try:
            fmt = detect_format(rows, where=f"data.generate.source={source}")
        except ConfigError:
            if not by_fields:
                raise
        if by_fields and fmt in GENERIC:  # problem_field/answer_field name the fields: as before readers
            fmt = "auto"
    if fmt in READERS:
        result = records_from_rows(rows, fmt, where=f"data.generate.source={source}", filter=cfg.source_filter)
        records, seen, unchecked = [], set(), 0
        for r in result.records:  # OpenR1: one record per correct generation, one problem here
            if r["problem"] in seen:
                continue
            seen.add(r["problem"])
            open_ended = r["reference_answer"] is None and not r["test_cases"] and not r.get("tests")
            if open_ended and not keep_unreferenced:
                unchecked += 1
                continue
            code = r.get("answer_kind") == "code"
            kind = "code" if code else ANSWER_KIND["general"] if open_ended else ANSWER_KIND.get(cfg.style, "math")
            records.append({"id": r["id"], "domain": cfg.domain, "problem": r["problem"], "reference_answer": r["reference_answer"],
                            "reference_solution": None, "answer_kind": kind, "source_dataset": source,
                            **({"test_cases": r["test_cases"]} if r["test_cases"] else {}),
                            **({k: r[k] for k in CODE_FIELDS if k in r} if code else {})})
        if unchecked or result.dropped:
            log.warning("data.generate.source=%s (%s): %d problems kept; dropped %d without a reference answer or test cases, %d unreadable rows %s",
                        source, result.format, len(records), unchecked, len(result.dropped), result.reasons() or "")
        return records
    records = []
    for i, row in enumerate(rows):
        if not matches(cfg.source_filter, row, row):
            continue
        conversation = row.get("prompt") if isinstance(row.get("prompt"), list) else None  # an SFT export row
        if (cfg.problem_field not in row and not conversation) or cfg.answer_field not in row:
            raise ConfigError(f"data.generate.source row {i + 1} lacks {cfg.problem_field!r} or {cfg.answer_field!r}; set data.generate.problem_field/answer_field")
        problem = str(row[cfg.problem_field]) if cfg.problem_field in row else next(m["content"] for m in reversed(conversation) if m["role"] == "user")
        records.append({
            "id": str(row.get("id") or stable_id("distill", problem)),
            "domain": cfg.domain,
            "problem": problem,
            "reference_answer": str(row[cfg.answer_field]),
            "reference_solution": None,
            "answer_kind": (row["source"].get("answer_kind") if isinstance(row.get("source"), dict) else None) or ANSWER_KIND.get(cfg.style, "math"),
            "source_dataset": source,
        })
    return records


def parse_problem(text: str, *, reference_solution: bool = True, style: str = "math", record_id: str = "") -> tuple[dict[str, str] | None, str | None]:
    """Return (fields, None) or (None, drop_reason) for one teacher output."""
    final = strip_reasoning(text)
    if not final.strip():
        return None, "empty_output"
    if style == "mcq":
        return parse_mcq(final, record_id)
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
    answer = extract_math_answer(solution.group(1), rule="multi")  # data generation reads several boxed answers as a set
    if not answer:
        return None, "missing_answer"
    return {"problem": question.group(1).strip(), "reference_solution": solution.group(1).strip(), "reference_answer": answer}, None


def parse_mcq(final: str, record_id: str) -> tuple[dict[str, str] | None, str | None]:
    """A question with one correct option and three distractors; the options are shuffled with a
    generator seeded by the record id, so the correct letter is uniform and stable across reruns."""
    question = QUESTION_RE.search(final)
    if not question or not question.group(1).strip():
        return None, "missing_problem_tag"
    correct = [c.strip() for c in CORRECT_RE.findall(final) if c.strip()]
    wrong = [w.strip() for w in WRONG_RE.findall(final) if w.strip()]
    if len(correct) != 1 or len(wrong) < len(LETTERS) - 1:
        return None, "missing_options"
    options = [correct[0], *wrong[: len(LETTERS) - 1]]
    if len({" ".join(o.lower().split()) for o in options}) < len(options):
        return None, "duplicate_options"
    order = list(range(len(options)))
    random.Random(f"mcq:{record_id}").shuffle(order)
    letter = LETTERS[order.index(0)]
    lines = [f"{LETTERS[pos]}) {options[i]}" for pos, i in enumerate(order)]
    solution = SOLUTION_RE.search(final, question.end())
    explanation = solution.group(1).strip() if solution and solution.group(1).strip() else ""
    return {
        "problem": question.group(1).strip() + "\n\n" + "\n".join(lines),
        "reference_solution": (explanation + "\n\n" if explanation else "") + f"The correct option is \\boxed{{{letter}}}.",
        "reference_answer": letter,
    }, None


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
        fields, reason = parse_problem(cfg.response_prefix + completion.text, reference_solution=cfg.reference_solution and cfg.style != "general",
                                       style=cfg.style, record_id=req["id"])
        if fields is None:
            dropped.append({**base, "reason": reason, "raw": completion.text[:2000], **usage})
            continue
        kept.append({**base, **fields, "teacher": teacher, "generation_usage": usage})
    return kept, dropped


def make_inputs(ctx: StageContext) -> list[Record]:
    """Generation requests drawn from the taxonomy, or the source problems of distillation mode."""
    g = ctx.cfg.data.generate
    if g.source:
        return load_source_problems(g, keep_unreferenced=ctx.cfg.data.agreement.keep_unreferenced)
    return build_requests(g, ctx.root, ctx.cfg.run.seed)


def run(ctx: StageContext, requests: list[Record], offset: int) -> tuple[list[Record], list[Record]]:
    if ctx.cfg.data.generate.source:  # distillation mode: the problems exist already
        return requests, []
    return generate_problems(ctx.teacher, requests, ctx.cfg.data.generate, teacher=ctx.cfg.teacher.model, seed_offset=offset)


STAGE = Stage(
    "generate", Kind.DATA, run, make_inputs=make_inputs, per_record=True, partitionable=True,
    config=("run.seed", "teacher.model", "data.generate", "data.agreement.keep_unreferenced"), needs_teacher=lambda cfg: not cfg.data.generate.source,
    hint="raise data.generate.num_problems or use a stronger teacher",
)
