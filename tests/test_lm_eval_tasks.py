"""The lm-eval task YAMLs in eval/lm_eval: generated from the protocol configs (recipes/eval/*.yaml), one
base per protocol that every task includes, and resolved by lm-eval's own TaskManager to the protocol's
settings; then against sandlab's own harness: both drive the same OpenAI-compatible server (a scripted
model that is right on some samples and wrong on others, by a hash of the exact prompt text and the
sample's index), and must send the same prompts with the same sampling and give the same per-sample
grades, for both protocols and across repeats."""

import collections
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import yaml
from chat_stub import ChatStub

from sandlab.benchmarks import load_benchmark
from sandlab.eval.harness import gold_of, render_prompt

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "eval" / "lm_eval"
SHARED = Path(os.environ.get("SANDLAB_BENCHMARK_DIR") or ROOT.parent / "shared" / "benchmarks")
LIMIT = 4
PROTOCOLS = {"paper": "correct_first", "standard": "shuffled"}
needs_benchmarks = pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/benchmarks")


def recipe(protocol: str) -> dict:
    """The protocol config as written, read without sandlab or the generator."""
    return yaml.safe_load((ROOT / "recipes" / "eval" / f"{protocol}.yaml").read_text())


SYSTEM = recipe("paper")["system_prompt"]
assert SYSTEM == recipe("standard")["system_prompt"]  # the scripted model below checks one system prompt


def expected_settings(protocol: str, bench: str) -> dict:
    """What the protocol states for one benchmark, in lm-eval's terms."""
    cfg = recipe(protocol)
    s = cfg["sampling"].get(bench) or cfg["sampling"]["default"]
    return {"repeats": s["n"], "description": cfg["system_prompt"],
            "generation_kwargs": {"until": s["stop"], "do_sample": s["temperature"] > 0, "temperature": s["temperature"],
                                  "top_p": s["top_p"], "max_gen_toks": s["max_tokens"]}}


def generator():
    spec = importlib.util.spec_from_file_location("sand_lm_eval_generate", TASKS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checked_in_tasks_are_what_the_generator_writes_from_the_protocols(tmp_path):
    gen = generator()
    assert gen.differences() == [], "run: python eval/lm_eval/generate.py"
    # The check notices a hand edit, a stale file and a missing one.
    copy = tmp_path / "lm_eval"
    shutil.copytree(TASKS, copy)
    (copy / "sand_paper_aime24.yaml").write_text((copy / "sand_paper_aime24.yaml").read_text().replace("temperature: 0.7", "temperature: 0.8"))
    (copy / "sand_paper_old.yaml").write_text("task: sand_paper_old\n")
    (copy / "sand_standard_math500.yaml").unlink()
    assert gen.differences(copy) == ["sand_standard_math500.yaml: missing", "sand_paper_old.yaml: not generated from any protocol (stale?)",
                                     "sand_paper_aime24.yaml: differs"]


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_lm_eval_resolves_every_task_to_its_protocols_settings(protocol):
    from lm_eval.tasks import TaskManager

    cfg = recipe(protocol)
    names = {f"sand_{protocol}_{b}" for b in cfg["benchmarks"]}
    for name in names:  # one base per protocol, shared through include:
        assert f"include: _sand_{protocol}_yaml\n" in (TASKS / f"{name}.yaml").read_text(), name
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    index = manager.task_index
    assert {n for n in index if n.startswith(f"sand_{protocol}_")} == names  # a task whose include fails is not indexed
    assert index[f"sand_{protocol}"].tags == names
    suffix = {"as_is": "", "correct_first": "_correct_first", "shuffled": "_shuffled"}[cfg["option_order"]]
    for bench in cfg["benchmarks"]:
        resolved = index[f"sand_{protocol}_{bench}"].cfg  # lm-eval's own include resolution
        want = expected_settings(protocol, bench)
        assert {k: resolved.get(k) for k in want} == want, bench
        assert resolved["output_type"] == "generate_until" and resolved["metadata"]["protocol"] == protocol
        for field in ("doc_to_text", "doc_to_target"):
            assert resolved[field].endswith(f"utils.{field}{suffix}"), (bench, field)
        assert resolved["process_results"].endswith(f"utils.process_results{suffix}_{cfg['answer_rule']}"), bench  # the protocol's answer rule
        assert resolved["filter_list"][0]["filter"][0]["filter_fn"].endswith("utils.keep_all_repeats")


@needs_benchmarks
@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_lm_eval_tasks_build_the_protocols_requests(protocol, monkeypatch):
    """The built Task objects (TaskConfig applied, functions imported, data loaded): sampling, and the
    system and user messages lm-eval renders under --apply_chat_template, as the harness renders them."""
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("SANDLAB_BENCHMARK_DIR", str(SHARED))
    cfg = recipe(protocol)
    tasks = TaskManager(include_path=str(TASKS), include_defaults=False).load([f"sand_{protocol}"])["tasks"]
    assert set(tasks) == {f"sand_{protocol}_{b}" for b in cfg["benchmarks"]}
    for bench in cfg["benchmarks"]:
        task, want = tasks[f"sand_{protocol}_{bench}"], expected_settings(protocol, bench)
        assert task.config.repeats == want["repeats"] and task.config.generation_kwargs == want["generation_kwargs"], bench
        doc, item = task.test_docs()[0], load_benchmark(bench, limit=1)[0]
        messages = task.fewshot_context(doc, 0, apply_chat_template=True, chat_template=lambda m, **_: m)
        assert messages == render_prompt(item, cfg["system_prompt"], cfg["option_order"], cfg["option_seed"]), bench
        assert task.doc_to_target(doc) == gold_of(item, cfg["option_order"], cfg["option_seed"])


def make_model():
    """The k-th sample of a prompt is right when crc32(prompt) + k is divisible by 3, else confidently wrong."""
    golds = {}
    for order in PROTOCOLS.values():
        for bench in ("math500", "gpqa_diamond"):
            for item in load_benchmark(bench, limit=LIMIT):
                golds[render_prompt(item, "", order)[-1]["content"]] = (gold_of(item, order), item["kind"])
    seen = collections.Counter()

    def respond(body):
        system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
        assert system == SYSTEM, system
        key, n = (user, body.get("temperature"), body.get("top_p"), body.get("max_tokens")), body.get("n", 1)
        first = seen[key]  # the k-th sample of a prompt, whether it comes as one request with n or n requests
        seen[key] += n
        gold, kind = golds.get(user, ("?", "math"))
        replies = []
        for k in range(first, first + n):
            right = (zlib.crc32(user.encode()) + k) % 3 == 0
            answer = gold if right else ("B" if gold == "A" else "A") if kind == "mcq" else "-12345"
            replies.append(f"Let me think.\nThe final answer is \\boxed{{{answer}}}.")
        return replies

    return respond, seen


@pytest.mark.slow
@pytest.mark.slow
@needs_benchmarks
def test_lm_eval_tasks_and_own_harness_give_the_same_grades(tmp_path):
    respond, seen = make_model()
    stub = ChatStub(respond)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SANDLAB_BENCHMARK_DIR": str(SHARED), "WANDB_MODE": "disabled"}
    try:
        ours = {}
        for protocol in PROTOCOLS:
            run = tmp_path / f"own-{protocol}"  # recipe demo, not tiny: tiny puts its own default sampling (16 tokens) over the protocol's
            result = subprocess.run([sys.executable, "eval/run.py", "--config-name", "demo", f"eval={protocol}", "eval.backend.backend=openai",
                                     f"eval.backend.base_urls=[{stub.url}]", "eval.models=[stub]", "eval.benchmarks=[math500,gpqa_diamond]",
                                     f"eval.limit={LIMIT}", "stages=[eval]", f"run.dir={run}"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
            assert result.returncode == 0, result.stderr[-2000:]
            for bench in ("math500", "gpqa_diamond"):
                samples = [json.loads(x) for x in (run / f"eval/stub/{bench}/samples.jsonl").read_text().splitlines()]
                for s in samples:
                    ours.setdefault((protocol, bench, s["item_id"]), []).append(s["correct"])
        own_prompts = collections.Counter(seen)
        seen.clear()
        out = tmp_path / "lm_eval"
        tasks = ",".join(f"sand_{p}_{b}" for p in PROTOCOLS for b in ("math500", "gpqa_diamond"))
        result = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-chat-completions", "--model_args",
                                 f"model=stub,base_url={stub.url}/chat/completions,num_concurrent=1,max_retries=1,tokenized_requests=False",
                                 "--apply_chat_template", "--include_path", "eval/lm_eval", "--tasks", tasks,
                                 "--limit", str(LIMIT), "--log_samples", "--output_path", str(out)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    finally:
        stub.close()
    # The same user messages with the same temperature, top_p and max_tokens, as many samples each (lm-eval
    # sends one request per repeat, sandlab one with n); the system message is checked in respond().
    assert seen == own_prompts
    theirs = {}
    for path in out.glob("*/samples_*.jsonl"):
        task = path.name.split("samples_", 1)[1].rsplit("_", 1)[0]
        _, protocol, bench = task.split("_", 2)
        for row in map(json.loads, path.read_text().splitlines()):
            theirs[(protocol, bench, row["doc"]["id"])] = row
    assert set(theirs) == set(ours) and len(ours) == 2 * 2 * LIMIT
    for key, grades in ours.items():
        row = theirs[key]
        repeats = len(row["filtered_resps"][0])
        assert repeats == len(grades) == recipe(key[0])["sampling"].get(key[1], recipe(key[0])["sampling"]["default"])["n"], key
        assert row["pass@1"] == pytest.approx(sum(grades) / len(grades)), key  # mean over all repeats, not the first
    outcomes = [g for grades in ours.values() for g in grades]
    assert any(outcomes) and not all(outcomes)  # a mix of right and wrong, so agreement means something
    assert any(row["pass@1"] != row["first_sample"] for row in theirs.values())  # the mean covers every repeat


def test_lm_eval_scorers_follow_the_answer_rule():
    """The paper tasks read the last box (AMD's rule); the standard ones read several boxes as a set."""
    spec = importlib.util.spec_from_file_location("sand_lm_eval_utils", TASKS / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)

    doc = {"kind": "math", "answer": "8", "id": "x", "problem": "p"}
    two_boxes = ["The answers are \\boxed{6} and \\boxed{8}."]
    assert utils.process_results_correct_first_last_box(doc, [two_boxes])["pass@1"] == 1.0
    assert utils.process_results_shuffled_multi(doc, [two_boxes])["pass@1"] == 0.0
    assert utils.process_results_shuffled_multi({**doc, "answer": "6, 8"}, [two_boxes])["pass@1"] == 1.0
