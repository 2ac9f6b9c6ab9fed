"""Helpers of the sandlab lm-eval tasks: the same benchmark items, prompt text, option order, answer
extraction and grader as sandlab's own harness (`sandlab.eval.harness`), so both give the same
per-sample grades. The task YAMLs beside this file are generated from recipes/eval/<protocol>.yaml by
generate.py (see there); run a protocol with

    lm_eval --model vllm --model_args pretrained=<ckpt>,max_model_len=32768 --include_path eval/lm_eval \\
        --tasks sand_paper --apply_chat_template --log_samples --output_path out/

The system prompt comes with the tasks (their description). Benchmarks load like everywhere in
sandlab: from the Hub, or from SANDLAB_BENCHMARK_DIR when set.
"""

from __future__ import annotations

import statistics

import datasets

from sandlab.benchmarks import load_benchmark
from sandlab.eval.harness import gold_of, render_prompt
from sandlab.grading import grade


def _dataset(name: str) -> datasets.DatasetDict:
    items = load_benchmark(name)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(items)})


def load_aime24(**_: object) -> datasets.DatasetDict:
    return _dataset("aime24")


def load_aime25(**_: object) -> datasets.DatasetDict:
    return _dataset("aime25")


def load_math500(**_: object) -> datasets.DatasetDict:
    return _dataset("math500")


def load_gpqa_diamond(**_: object) -> datasets.DatasetDict:
    return _dataset("gpqa_diamond")


# Prompt text (the user message; the system prompt is the task's description) and gold answer, per
# option order (multiple-choice items only; math items read the same in every order).
def doc_to_text(doc: dict) -> str:
    return render_prompt(doc, "")[-1]["content"]


def doc_to_target(doc: dict) -> str:
    return gold_of(doc)


def doc_to_text_correct_first(doc: dict) -> str:  # option_order correct_first (paper: AMD's GPQA file lists it first)
    return render_prompt(doc, "", "correct_first")[-1]["content"]


def doc_to_target_correct_first(doc: dict) -> str:
    return gold_of(doc, "correct_first")


def doc_to_text_shuffled(doc: dict) -> str:  # option_order shuffled, option_seed 0 (standard: a fixed permutation per question)
    return render_prompt(doc, "", "shuffled", 0)[-1]["content"]


def doc_to_target_shuffled(doc: dict) -> str:
    return gold_of(doc, "shuffled", 0)


def keep_all_repeats(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """The filter: every repeat goes on to scoring (lm-eval's default keeps only the first)."""
    return resps


def _score(doc: dict, responses: list[str], gold: str, rule: str) -> dict[str, float]:
    grades = [grade(r, gold, kind=doc["kind"], rule=rule).correct for r in responses]
    return {"pass@1": statistics.fmean(float(g) for g in grades), "first_sample": float(grades[0])}


def _results_scorer(order: str, rule: str):
    """process_results for one option order and answer rule (last_box: the paper's; multi: boxed answers as a set)."""
    def process_results(doc: dict, results: list) -> dict[str, float]:
        """Mean pass@1 over all repeats of one document, graded by sandlab's grader."""
        responses = results[0] if isinstance(results[0], list) else list(results)
        return _score(doc, responses, gold_of(doc, order, 0), rule)

    return process_results


# The task YAMLs name one of these (generate.py picks it from the protocol's option_order and answer_rule).
process_results_multi = _results_scorer("as_is", "multi")
process_results_last_box = _results_scorer("as_is", "last_box")
process_results_correct_first_multi = _results_scorer("correct_first", "multi")
process_results_correct_first_last_box = _results_scorer("correct_first", "last_box")
process_results_shuffled_multi = _results_scorer("shuffled", "multi")
process_results_shuffled_last_box = _results_scorer("shuffled", "last_box")
