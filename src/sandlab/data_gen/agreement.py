"""Answer agreement: keep a problem when enough independent answers are equivalent (shared grader).

Modes (``data.agreement.mode``): ``majority`` (seedless SAND: the answers of k solutions, plus the
teacher's reference answer, must agree), ``reference`` (distillation: solutions must match a known
answer), ``single`` (open-ended tasks: keep the first complete response) and ``tests`` (code: a
solution must pass every test case in the sandbox, ``filter_by_tests``).

With ``llm_judge`` the teacher steps in where the grader cannot: it reads off the final answer of a
complete solution that states none in an extractable form, and decides whether two textual answers
(which math-verify cannot parse, e.g. "Alice wins" vs "the first player") are the same.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sandlab.config import AgreementStage, AnswerRule
from sandlab.data_gen.prompts import load_prompt
from sandlab.grading import GradeItem, GradingPool, extract_answer, strip_reasoning
from sandlab.inference.base import ChatBackend, sampling_from
from sandlab.records import Record

# Numbers written plainly or in LaTeX: 42, -3.5, 1,000, \frac{3}{4}, 2\sqrt{3}, 5\pi/6, 2^{10}, 30^\circ.
_NUMERIC = re.compile(r"^(?:[\d\s.,+\-*/^(){}√]|\\d?frac|\\sqrt|\\pi|\\cdot|\\times|\\left|\\right|\^\\circ|\\%|%)+$")
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_WORD = re.compile(r"[A-Za-z]{3,}")
_YES_NO = re.compile(r"\b(yes|no)\b")
# The judge sees the end of a solution, where the answer is; long traces are cut from the front.
_JUDGE_TAIL_CHARS = 6000
CLUSTER_BATCH = 256  # problems whose answers are clustered in one batch of pool calls


def is_numeric_answer(answer: str) -> bool:
    return bool(re.search(r"\d", answer)) and bool(_NUMERIC.match(answer.strip()))


def is_textual_answer(answer: str) -> bool:
    """Answers with words outside LaTeX commands ("\\text{Alice wins}", "no solution"): math-verify
    cannot compare them, so only string equality or the judge can."""
    return bool(_WORD.search(_LATEX_COMMAND.sub(" ", answer)))


def answer_kind(rec: Record) -> str:
    return rec.get("answer_kind") or "math"


def cluster_answers(answers: list[str], pool: GradingPool, kind: str = "math") -> list[list[int]]:
    """Greedy equivalence clusters: each answer joins the first cluster whose representative it equals.

    A cluster's representative is its first answer; it is the gold of each comparison (math-verify's
    ``verify(parse(gold), parse(pred))`` is not symmetric). See ``cluster_answers_many``.
    """
    return cluster_answers_many([answers], pool, [kind])[0]


def cluster_answers_many(groups: list[list[str]], pool: GradingPool, kinds: list[str] | None = None) -> list[list[list[int]]]:
    """``cluster_answers`` for many answer lists, batched: one ``pool.grade_many`` call per round.

    Round k makes each list's first unclustered answer the representative of its k-th cluster and
    compares every later unclustered answer of that list with it, all lists in the same call. This is
    exactly the greedy one-answer-at-a-time order: an answer reaches round k only if it matched none
    of the earlier representatives, and the same (representative, answer) pairs are compared, so the
    clusters are identical, with as many pool calls as the largest number of clusters in one list
    instead of one per answer. A verdict depends only on the two strings, so answers repeated
    verbatim in a list are graded once per round.
    """
    kinds = kinds if kinds is not None else ["math"] * len(groups)
    if len(kinds) != len(groups):
        raise ValueError(f"{len(kinds)} kinds for {len(groups)} answer lists")
    clusters: list[list[list[int]]] = [[] for _ in groups]
    unclustered = [list(range(len(answers))) for answers in groups]
    while True:
        items: dict[GradeItem, int] = {}  # unique items of this round -> position in the batch
        where: list[tuple[int, int, int]] = []  # (list, answer, position of its item)
        for g, answers in enumerate(groups):
            if not unclustered[g]:
                continue
            rep, *rest = unclustered[g]
            clusters[g].append([rep])
            unclustered[g] = []
            for j in rest:
                item = GradeItem(response=f"\\boxed{{{answers[j]}}}", gold=answers[rep], kind=kinds[g], rule=AnswerRule.multi)
                where.append((g, j, items.setdefault(item, len(items))))
        if not items:
            return clusters
        results = pool.grade_many(list(items))
        for g, j, k in where:
            if results[k].correct:
                clusters[g][-1].append(j)
            else:
                unclustered[g].append(j)


def _judge_sampling(cfg: AgreementStage):
    return sampling_from(cfg.judge_sampling, n=1)


def judge_missing_answers(judge: ChatBackend, records: list[Record], cfg: AgreementStage, root: Path) -> list[Record]:
    """Ask the judge for the final answer of each complete solution whose answer the grader could not
    extract; found answers are marked ``answer_source: judge``."""
    template = load_prompt(root / cfg.judge_prompt, "data.agreement.judge_prompt", problem="", solution="")
    jobs = [
        (r, i) for r, rec in enumerate(records) if answer_kind(rec) != "open"
        for i, s in enumerate(rec["solutions"]) if not s.get("answer") and s.get("finish_reason") == "stop" and s.get("text", "").strip()
    ]
    if not jobs:
        return records
    conversations = []
    for r, i in jobs:
        text = records[r]["solutions"][i]["text"]
        tail = (strip_reasoning(text).strip() or text)[-_JUDGE_TAIL_CHARS:]
        conversations.append([{"role": "user", "content": template.format(problem=records[r]["problem"], solution=tail)}])
    outputs = judge.generate(conversations, _judge_sampling(cfg), desc="judge: read answers")
    out = [{**rec, "solutions": [dict(s) for s in rec["solutions"]]} for rec in records]
    for (r, i), (completion,) in zip(jobs, outputs):
        answer = extract_answer(completion.text, answer_kind(records[r]), AnswerRule.multi) if completion.ok and not completion.truncated else None
        if answer and answer.strip().upper() != "NONE":
            out[r]["solutions"][i].update(answer=answer, answer_source="judge")
    return out


def judge_equivalent(judge: ChatBackend, pairs: list[tuple[str, str, str]], cfg: AgreementStage, root: Path) -> list[bool]:
    """For (problem, answer a, answer b) triples: does the judge say the answers are the same?"""
    template = load_prompt(root / cfg.judge_equivalence_prompt, "data.agreement.judge_equivalence_prompt", problem="", a="", b="")
    conversations = [[{"role": "user", "content": template.format(problem=p, a=a, b=b)}] for p, a, b in pairs]
    outputs = judge.generate(conversations, _judge_sampling(cfg), desc="judge: compare answers")
    verdicts = []
    for (completion,) in outputs:
        words = _YES_NO.findall(strip_reasoning(completion.text).lower()) if completion.ok else []
        verdicts.append(bool(words) and words[-1] == "yes")  # the last YES/NO is the verdict
    return verdicts


def _merge(clusters: list[list[int]], same: list[tuple[int, int]]) -> list[list[int]]:
    """Union the clusters that the judge called equivalent (pairs of cluster indices)."""
    parent = list(range(len(clusters)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in same:
        parent[find(b)] = find(a)
    merged: dict[int, list[int]] = {}
    for ci, members in enumerate(clusters):
        merged.setdefault(find(ci), []).extend(members)
    return [sorted(m) for m in merged.values()]


def filter_by_reference(records: list[Record], cfg: AgreementStage, pool: GradingPool) -> tuple[list[Record], list[Record]]:
    """Distillation mode: keep a problem when at least ``min_votes`` solutions match its reference
    answer; the first matching solution becomes the trace."""
    items = [GradeItem(response=s["text"], gold=str(rec["reference_answer"]), kind=answer_kind(rec), rule=AnswerRule.multi)
             for rec in records for s in rec["solutions"]]
    grades = iter(pool.grade_many(items, desc="verify against reference"))
    kept, dropped = [], []
    for rec in records:
        matches = [s for s in rec["solutions"] if next(grades).correct]
        stats = {"verified": len(matches), "total_votes": len(rec["solutions"])}
        if len(matches) >= cfg.min_votes:
            kept.append({**rec, **stats, "agreement": len(matches) / len(rec["solutions"]), "answer": str(rec["reference_answer"]), "solution": matches[0]["text"]})
        else:
            dropped.append({**rec, **stats, "reason": "reference_mismatch"})
    return kept, dropped


def filter_by_tests(records: list[Record], cfg: AgreementStage, verifier: Any) -> tuple[list[Record], list[Record]]:
    """Code problems: keep one when at least ``min_votes`` solutions pass every test (``verifier``, a
    ``sandlab.verification.CodeVerifier``); the first passing solution becomes the trace. A sandbox
    failure (infra_error) says nothing about the code, so it is no fail: a problem without enough
    passes and with such a failure is dropped as ``infra_error``, not ``tests_failed``. Truncated
    solutions are not run (a cut trace is no training data)."""
    from sandlab.errors import ConfigError  # noqa: PLC0415
    from sandlab.verification import CodeItem  # noqa: PLC0415
    from sandlab.verification.testcases import normalize_tests  # noqa: PLC0415

    plans, items, dropped = [], [], []
    for rec in records:
        raw = rec.get("tests") or rec.get("test_cases")
        if not raw:
            dropped.append({**rec, "reason": "no_tests"})
            continue
        try:
            tests, fn_name = normalize_tests(raw, rec.get("fn_name"), where=f"record {rec['id']}")
        except ConfigError as exc:
            dropped.append({**rec, "reason": "malformed_tests", "detail": str(exc)})
            continue
        runs = [i for i, s in enumerate(rec["solutions"]) if s.get("finish_reason") != "length"]
        plans.append((rec, runs, len(items)))
        items.extend(CodeItem(rec["solutions"][i].get("text") or "", tuple(tests), fn_name) for i in runs)
    results = verifier.verify_many(items, desc="verify against tests") if items else []
    kept = []
    for rec, runs, start in plans:
        verdicts = dict(zip(runs, results[start:start + len(runs)]))
        solutions = [{**s, "verification": {k: v for k, v in verdicts[i].to_dict().items() if k != "statuses"}} if i in verdicts else dict(s)
                     for i, s in enumerate(rec["solutions"])]
        passed = [i for i in runs if verdicts[i].passed]
        infra = sum(verdicts[i].infra_error for i in runs)
        stats = {"verified": len(passed), "total_votes": len(rec["solutions"]), **({"infra_errors": infra} if infra else {})}
        if len(passed) >= cfg.min_votes:
            kept.append({**rec, "solutions": solutions, **stats, "agreement": round(len(passed) / len(rec["solutions"]), 4), "answer": None,
                         "solution": rec["solutions"][passed[0]]["text"]})
        else:
            dropped.append({**rec, "solutions": solutions, **stats, "reason": "infra_error" if infra else "tests_failed"})
    return kept, dropped


def keep_first_complete(records: list[Record]) -> tuple[list[Record], list[Record]]:
    """Open-ended tasks: the first response that finished and says something becomes the trace."""
    kept, dropped = [], []
    for rec in records:
        complete = [s for s in rec["solutions"] if s.get("finish_reason") == "stop" and strip_reasoning(s.get("text", "")).strip()]
        if complete:
            kept.append({**rec, "answer": None, "solution": complete[0]["text"], "total_votes": len(rec["solutions"])})
        else:
            dropped.append({**rec, "reason": "no_complete_response"})
    return kept, dropped


def filter_by_agreement(
    records: list[Record], cfg: AgreementStage, pool: GradingPool, *, include_reference: bool,
    judge: ChatBackend | None = None, root: Path | None = None,
) -> tuple[list[Record], list[Record]]:
    from tqdm.auto import tqdm  # noqa: PLC0415

    use_judge = cfg.llm_judge and judge is not None and root is not None
    if use_judge:
        records = judge_missing_answers(judge, records, cfg, root)
    # Pass 1: votes (answer, index into solutions or -1 for the reference) and grader clusters.
    plans: list[tuple[Record, list[tuple[str, int]], list[list[int]], int] | None] = [None] * len(records)
    dropped_early: dict[int, Record] = {}
    pending: list[tuple[int, list[tuple[str, int]], int]] = []
    for r, rec in enumerate(records):
        votes = [(s["answer"], i) for i, s in enumerate(rec["solutions"]) if s.get("answer")]
        with_reference = include_reference and rec.get("reference_answer")
        if with_reference:
            votes.append((str(rec["reference_answer"]), -1))
        if votes:
            pending.append((r, votes, len(rec["solutions"]) + (1 if with_reference else 0)))
        else:
            dropped_early[r] = {**rec, "reason": "no_parsable_answers"}
    # Clustered CLUSTER_BATCH problems at a time: one pool call per cluster round of the batch instead
    # of per problem (fewer worker round trips), memory bounded by the batch.
    with tqdm(total=len(pending), desc="answer agreement", unit="problem", dynamic_ncols=True) as bar:
        for start in range(0, len(pending), CLUSTER_BATCH):
            batch = pending[start:start + CLUSTER_BATCH]
            groups = [[a for a, _ in votes] for _, votes, _ in batch]
            clustered = cluster_answers_many(groups, pool, [answer_kind(records[r]) for r, _, _ in batch])
            for (r, votes, total), clusters in zip(batch, clustered):
                plans[r] = (records[r], votes, clusters, total)
            bar.update(len(batch))
    # Pass 2 (judge): textual cluster representatives the grader could not compare, in one batch.
    if use_judge:
        pairs, where = [], []
        for r, plan in enumerate(plans):
            if plan is None or answer_kind(plan[0]) != "math" or len(plan[2]) < 2:
                continue
            rec, votes, clusters, _ = plan
            reps = [votes[c[0]][0] for c in clusters]
            for a in range(len(reps)):
                for b in range(a + 1, len(reps)):
                    if is_textual_answer(reps[a]) or is_textual_answer(reps[b]):
                        pairs.append((rec["problem"], reps[a], reps[b]))
                        where.append((r, a, b))
        if pairs:
            same: dict[int, list[tuple[int, int]]] = {}
            for (r, a, b), yes in zip(where, judge_equivalent(judge, pairs, cfg, root)):
                if yes:
                    same.setdefault(r, []).append((a, b))
            for r, links in same.items():
                rec, votes, clusters, total = plans[r]
                plans[r] = (rec, votes, _merge(clusters, links), total)
    # Pass 3: decide.
    kept, dropped = [], []
    for r, plan in enumerate(plans):
        if plan is None:
            dropped.append(dropped_early[r])
            continue
        rec, votes, clusters, total = plan
        best = max(clusters, key=len)
        share = len(best) / total
        stats = {"agreement": round(share, 4), "votes": len(best), "total_votes": total}
        if len(best) < cfg.min_votes or share < cfg.min_agreement:
            dropped.append({**rec, **stats, "reason": "disagreement"})
            continue
        answer = votes[best[0]][0]
        if cfg.require_numeric and answer_kind(rec) == "math" and not is_numeric_answer(answer):
            dropped.append({**rec, **stats, "answer": answer, "reason": "non_numeric_answer"})
            continue
        solution_ids = [votes[j][1] for j in best if votes[j][1] >= 0]
        chosen = rec["solutions"][solution_ids[0]]["text"] if solution_ids else rec["reference_solution"]
        kept.append({**rec, **stats, "answer": answer, "solution": chosen})
    return kept, dropped


def decides_early(cfg: AgreementStage) -> bool:
    """Whether a problem's drop can be read off part of its solutions: the grader's verdicts decide
    (modes majority and reference); the judge could still supply answers or merge clusters later."""
    return cfg.mode in ("majority", "reference") and not cfg.llm_judge


def cannot_be_kept(records: list[Record], k: int, cfg: AgreementStage, pool: GradingPool, *, include_reference: bool) -> list[bool]:
    """For records holding the first solutions of ``k`` (in sample order): True where no later
    solutions can make ``filter_by_agreement`` / ``filter_by_reference`` keep the problem, so the
    solve stage samples it no further (``data.solve.adaptive``).

    Majority: greedy clustering is prefix-stable (an answer joins the first earlier representative it
    equals), so the clusters of the solutions so far stay as they are; the reference vote, compared
    last, joins the first of them it equals (or a later one). A cluster can grow by at most the
    ``m`` solutions still to come (+1 for the reference), a new one to at most ``m`` (+1). Dropped if
    even that best case misses ``min_votes`` or ``min_agreement`` of the full ``k`` (+1) votes.
    Reference: dropped if the matches so far plus ``m`` miss ``min_votes``.
    """
    verdicts = [False] * len(records)
    if not decides_early(cfg):
        return verdicts
    groups, kinds, where = [], [], []
    items: list[GradeItem] = []
    item_of: list[tuple[int, int]] = []  # reference mode: (record, first item index)
    for r, rec in enumerate(records):
        m = k - len(rec["solutions"])
        if cfg.mode == "reference":
            if rec.get("reference_answer") in (None, ""):
                continue  # keep_unreferenced: kept or dropped by the score stage, not by answers
            item_of.append((r, len(items)))
            items += [GradeItem(response=s["text"], gold=str(rec["reference_answer"]), kind=answer_kind(rec), rule=AnswerRule.multi)
                      for s in rec["solutions"]]
            continue
        if answer_kind(rec) in ("code", "open"):
            continue
        answers = [s["answer"] for s in rec["solutions"] if s.get("answer")]
        with_reference = bool(include_reference and rec.get("reference_answer"))
        groups.append(answers + ([str(rec["reference_answer"])] if with_reference else []))
        kinds.append(answer_kind(rec))
        where.append((r, m, len(answers), with_reference))
    if cfg.mode == "reference":
        grades = pool.grade_many(items) if items else []
        for r, start in item_of:
            n = len(records[r]["solutions"])
            matches = sum(g.correct for g in grades[start:start + n])
            verdicts[r] = matches + (k - n) < cfg.min_votes
        return verdicts
    for (r, m, n_answers, with_reference), clusters in zip(where, cluster_answers_many(groups, pool, kinds) if groups else []):
        ref = n_answers if with_reference else None  # the reference's position in its group
        best = m + (1 if with_reference and not any(ref in c and c[0] != ref for c in clusters) else 0)  # a new cluster
        for c in clusters:
            if c[0] == ref:
                continue  # the reference's own cluster: counted as a new one above
            best = max(best, len(c) + m)  # the reference, if in it, is already one of len(c)
        total = k + (1 if with_reference else 0)
        verdicts[r] = best < cfg.min_votes or best / total < cfg.min_agreement
    return verdicts
