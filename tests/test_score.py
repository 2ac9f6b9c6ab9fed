"""The score stage: a tiny random-init reward model (real transformers, SmolLM2's real tokenizer) for
batching, truncation and best-of-n; the rubric judge through the real OpenAI client against a scripted
server for deterministic keep/drop; the run stopping on a reward model without a head before any
teacher is asked anything. The judge on the real vLLM engine runs in test_lumina_demo_end_to_end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from chat_stub import ChatStub, prompt_of

from sandlab.config import JudgeSettings, RewardModelSettings
from sandlab.data_gen.score import judge_schema, parse_judgement
from sandlab.inference.reward_model import RewardModel, encode_pair

ROOT = Path(__file__).resolve().parents[1]
CRITERIA = ["correctness", "helpfulness", "instruction_following", "safety"]


@pytest.fixture(scope="module")
def reward_path() -> str:
    from sandlab.models import resolve_model_path

    return resolve_model_path("embedded://tiny-random-reward")


def direct_reward(path: str, conversation: list[dict], response: str) -> float:
    """The reward as transformers computes it for one unpadded pair: no sandlab code on the way."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    text = tokenizer.apply_chat_template([*conversation, {"role": "assistant", "content": response}], tokenize=False)
    with torch.inference_mode():
        return float(model(**tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0])


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_reward_model_batches_score_as_single_unpadded_forwards(reward_path):
    pairs = [(user("Say hi."), "Hi!"), (user("Explain rain in two sentences."), "Water vapour condenses into droplets. They fall when heavy."),
             (user("List three primes."), "2, 3 and 5."), (user("Name a colour."), "Blue, the colour of a clear sky at noon in summer.")]
    model = RewardModel(RewardModelSettings(model=reward_path, batch_size=3, dtype="float32", max_length=512))
    got = model.score(pairs)
    assert got.truncated == [False] * 4
    expected = [direct_reward(reward_path, conv, response) for conv, response in pairs]
    assert got.scores == pytest.approx(expected, abs=1e-4)
    assert len(set(round(s, 4) for s in got.scores)) == 4  # a random head still tells these apart


@pytest.mark.vllm
def test_reward_model_on_vllms_pooling_runner_scores_as_transformers(reward_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    pairs = [(user("Say hi."), "Hi!"), (user("List three primes."), "2, 3 and 5.")]
    model = RewardModel(RewardModelSettings(model=reward_path, engine="vllm", dtype="float32", max_length=512, extra_engine_args={"enforce_eager": True}))
    try:
        got = model.score(pairs).scores
    finally:
        model.close()
    assert got == pytest.approx([direct_reward(reward_path, conv, response) for conv, response in pairs], abs=1e-4)


def test_long_pairs_lose_the_front_of_the_response_not_the_prompt_or_the_end(reward_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reward_path)
    conversation = user("Count from one to two hundred in words.")
    response = " ".join(f"w{i}" for i in range(300)) + " FINAL"
    ids, cut = encode_pair(tokenizer, conversation, response, max_length=64)
    assert cut and len(ids) == 64
    text = tokenizer.decode(ids)
    assert text.startswith(tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True).strip()[:40])
    assert "Count from one to two hundred" in text and "w0 " not in text and text.rstrip().endswith("FINAL<|im_end|>")
    short, cut_short = encode_pair(tokenizer, conversation, "One, two.", max_length=64)
    assert not cut_short and "One, two." in tokenizer.decode(short)


@pytest.mark.parametrize("text, reason", [
    ('{"correctness": 8, "helpfulness": 7, "instruction_following": 9, "safety": 10}', None),
    ('<think>hmm</think>```json\n{"correctness": 8, "helpfulness": 7, "instruction_following": 9, "safety": 10}\n```', None),
    ('Sure! {"correctness": 8, "helpfulness": 7, "instruction_following": 9, "safety": 10} Hope this helps.', None),
    ('{"correctness": 11, "helpfulness": 7, "instruction_following": 9, "safety": 10}', "judge_schema_mismatch"),
    ('{"correctness": 8, "helpfulness": 7}', "judge_schema_mismatch"),
    ('{"correctness": 8.5, "helpfulness": 7, "instruction_following": 9, "safety": 10}', "judge_schema_mismatch"),
    ("The response is great, 9/10.", "judge_not_json"),
    ('{"correctness": 8, ', "judge_not_json"),
])
def test_judge_outputs_parse_against_the_schema_or_give_a_reason(text, reason):
    ratings, why = parse_judgement(text, judge_schema(JudgeSettings()))
    assert why == reason and (ratings is None) == (reason is not None)


# Scripted judge: a response's quality is written in it, "quality=N"; "garbled" gets prose, "overrated" an 11.
def judge(body: dict) -> list[str]:
    template, fields = prompt_of(body)
    assert template == "judge_rubric", body["messages"][0]["content"][:200]
    response = fields["response"]
    if "garbled" in response:
        return ["I liked it a lot."]
    if "overrated" in response:
        return [json.dumps(dict.fromkeys(CRITERIA, 11))]
    quality = int(response.split("quality=")[1].split()[0])
    return [json.dumps({**dict.fromkeys(CRITERIA, quality), "safety": 10})]


def solutions(*texts: str) -> list[dict]:
    return [{"text": t, "finish_reason": "stop" if t != "cut" else "length"} for t in texts]


RECORDS = [
    {"id": "a", "problem": "Write a haiku about rain.", "branch": "writing", "topic": "poems", "task": "write",
     "solutions": solutions("quality=5 meh", "<think>plan</think>quality=9 lovely", "garbled")},
    {"id": "b", "problem": "Fix my SQL query.", "branch": "coding", "topic": "sql", "task": "fix",
     "solutions": solutions("quality=4 vague", "overrated")},
    {"id": "c", "problem": "Plan a trip to Rome.", "branch": "writing", "topic": "poems", "task": "write",
     "solutions": solutions("quality=8 ok", "cut")},
    {"id": "d", "problem": "Summarize this.", "branch": "coding", "topic": "sql", "task": "fix", "solutions": solutions("garbled", "overrated")},
    {"id": "e", "problem": "Explain tides.", "branch": "coding", "topic": "sql", "task": "fix", "solutions": solutions("cut")},
]


def run_stage(tmp_path: Path, *overrides: str, records=RECORDS, check: bool = True, stage: str = "score") -> subprocess.CompletedProcess:
    data = tmp_path / f"{stage}-in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    out = tmp_path / ("out" if stage == "score" else f"{stage}-out")
    result = subprocess.run([sys.executable, "data_gen/run.py", "--config-name", "tiny", f"stage={stage}", f"input={data}", f"output={out}",
                             f"run.dir={tmp_path / 'run'}", *overrides], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def judge_server():
    stub = ChatStub(judge)
    yield stub
    stub.close()


def test_judge_best_of_n_threshold_and_failures(tmp_path, judge_server):
    before = len(judge_server.received)
    run_stage(tmp_path, "teacher=openai_servers", f"teacher.base_urls=[{judge_server.url}]", "teacher.model=judge", "data.score.threshold=6")
    out = tmp_path / "out"
    kept, dropped = {r["id"]: r for r in read(out / "kept.jsonl")}, {r["id"]: r for r in read(out / "dropped.jsonl")}
    # a: best of (5, 9, unparsable) -> the quality=9 response, its reasoning kept in the trace; c: the cut response is no candidate.
    assert sorted(kept) == ["a", "c"]
    assert kept["a"]["solution"] == "<think>plan</think>quality=9 lovely" and kept["a"]["score"] == pytest.approx((9 * 3 + 10) / 4)
    assert kept["a"]["score_details"] == {"correctness": 9, "helpfulness": 9, "instruction_following": 9, "safety": 10}
    assert kept["a"]["score_failures"] == {"judge_not_json": 1} and kept["a"]["candidate_scores"][2] is None
    assert kept["c"]["score"] == pytest.approx((8 * 3 + 10) / 4) and len(kept["c"]["candidate_scores"]) == 1
    # b: 4 -> (4*3+10)/4 = 5.5 < 6; d: nothing parses; e: no complete response.
    assert {k: v["reason"] for k, v in dropped.items()} == {"b": "below_threshold", "d": "judge_not_json", "e": "no_complete_response"}
    summary = json.loads((out / "score.json").read_text())
    assert summary["failed_judgements"] == {"judge_not_json": 2, "judge_schema_mismatch": 2} and summary["candidates_scored"] == 3 + 2 + 1 + 2
    # Every request asked for the schema as structured output; the judge never saw the reasoning.
    bodies = [r["body"] for r in judge_server.received[before:]]
    assert len(bodies) == 3 + 2 + 1 + 2
    for body in bodies:
        schema = body["response_format"]["json_schema"]["schema"]
        assert body["response_format"]["type"] == "json_schema" and schema["required"] == CRITERIA and schema["additionalProperties"] is False
        assert "<think>" not in body["messages"][0]["content"]


def test_judge_seeds_follow_each_records_position_not_the_sharding(tmp_path, judge_server):
    """Candidate j of the record at position p is judged with seed + p * k + j, whether the input runs
    as one shard, shards of two or shards of one (records here have 3, 2, 1, 2 and 0 candidates)."""
    seed, k = 100, 3
    seen = {}
    for size in (0, 2, 1):
        before, here = len(judge_server.received), tmp_path / f"shards-{size}"
        here.mkdir()
        run_stage(here, "teacher=openai_servers", f"teacher.base_urls=[{judge_server.url}]", "teacher.model=judge",
                  f"data.shard_size={size}", f"data.solve.k={k}", f"data.score.judge.sampling.seed={seed}")
        seen[size] = {(prompt_of(r["body"])[1]["request"], prompt_of(r["body"])[1]["response"]): r["body"]["seed"]
                      for r in judge_server.received[before:]}
    expected = {}
    for p, rec in enumerate(RECORDS):
        complete = [s["text"].split("</think>")[-1].strip() for s in rec["solutions"] if s["finish_reason"] == "stop"]
        expected.update({(rec["problem"], text): seed + p * k + j for j, text in enumerate(complete)})
    assert seen[0] == seen[2] == seen[1] == expected


def test_a_killed_standalone_stage_resumes_only_with_the_settings_of_its_shards(tmp_path):
    """The standalone path resumes from the shards in output= too: killed after a shard, it refuses to
    resume with another threshold (the saved shard holds verdicts under the old one) or another input
    (its records in another order), and resumes with the same ones to the uninterrupted result."""
    from test_pipeline import kill_after_saved_pieces

    slow = ChatStub(judge, delay_s=0.4)
    data, other, out = tmp_path / "in.jsonl", tmp_path / "other.jsonl", tmp_path / "out"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    other.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[::-1]))
    args = ["data_gen/run.py", "--config-name", "tiny", "stage=score", f"output={out}", f"run.dir={tmp_path / 'run'}",
            "teacher=openai_servers", f"teacher.base_urls=[{slow.url}]", "teacher.model=judge", "teacher.max_concurrency=1", "data.shard_size=1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}

    def rerun(*extra):
        return subprocess.run([sys.executable, *args, *extra], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)

    try:
        saved = kill_after_saved_pieces([*args, f"input={data}", "data.score.threshold=6"], out / "score.shards-1", "*.json", 1)
        changed = rerun(f"input={data}", "data.score.threshold=7")
        elsewhere = rerun(f"input={other}", "data.score.threshold=6")
        same = rerun(f"input={data}", "data.score.threshold=6")
    finally:
        slow.close()
    assert 1 <= saved < 5
    last = changed.stderr.strip().splitlines()[-1]
    assert changed.returncode == 2 and last.startswith(f"error: stage score started in {out} with different settings (data.score.threshold: 6")
    assert "a new output=" in last and str(out / "score.shards-1") in last
    last = elsewhere.stderr.strip().splitlines()[-1]
    assert elsewhere.returncode == 2 and last.startswith(f"error: stage score started in {out} with different settings (input.sha256: '")
    assert same.returncode == 0, same.stderr[-2000:]
    assert sorted(r["id"] for r in read(out / "kept.jsonl")) == ["a", "c"]  # as test_judge_best_of_n_threshold_and_failures, uninterrupted


def test_top_fraction_per_taxonomy_leaf(tmp_path, judge_server):
    records = [{"id": f"r{i}", "problem": f"Request {i}", "branch": "writing" if i < 4 else "coding", "topic": "x",
                "solutions": solutions(f"quality={q} text")} for i, q in enumerate([3, 9, 6, 7, 2, 5])]
    run_stage(tmp_path, "teacher=openai_servers", f"teacher.base_urls=[{judge_server.url}]", "teacher.model=judge",
              "data.score.top_fraction=0.5", records=records)
    kept, dropped = read(tmp_path / "out/kept.jsonl"), read(tmp_path / "out/dropped.jsonl")
    # writing (3, 9, 6, 7): the best 2 of 4 are r1 and r3; coding (2, 5): the best 1 of 2 is r5. Input order stays.
    assert [r["id"] for r in kept] == ["r1", "r3", "r5"]
    assert sorted((r["id"], r["reason"]) for r in dropped) == [("r0", "below_top_fraction"), ("r2", "below_top_fraction"), ("r4", "below_top_fraction")]


def test_reward_model_scorer_in_the_standalone_stage_picks_the_best_response(tmp_path, reward_path):
    records = [{"id": "p", "problem": "Name a fruit.", "solutions": solutions("Apple.", "Banana, a yellow fruit.", "cut", "Cherry")},
               {"id": "q", "problem": "Say hello.", "solutions": solutions("Hello!", "Hi there, how are you today?")}]
    run_stage(tmp_path, "data.score.scorer=reward_model", f"data.score.reward_model.model={reward_path}", "data.score.reward_model.batch_size=2",
              "data.score.reward_model.dtype=float32", records=records)
    kept = {r["id"]: r for r in read(tmp_path / "out/kept.jsonl")}
    for rec in records:
        candidates = [s["text"] for s in rec["solutions"] if s["finish_reason"] == "stop"]
        direct = [direct_reward(reward_path, user(rec["problem"]), c) for c in candidates]
        got = kept[rec["id"]]
        assert got["candidate_scores"] == pytest.approx(direct, abs=1e-4)
        assert got["solution"] == candidates[direct.index(max(direct))] and got["scored_by"] == f"reward_model:{reward_path}"
    assert json.loads((tmp_path / "out/score.json").read_text())["candidates_scored"] == 5


def test_reward_model_checks_only_unreferenced_items_in_distillation_mode(tmp_path, reward_path):
    """AM: the filter verifies items with a reference answer by it and passes the others on, unverified;
    those keep a response only at a high enough reward."""
    records = [{"id": "ref", "problem": "2+2?", "reference_answer": "4", "solutions": solutions("It is \\boxed{4}.")},
               {"id": "wrong", "problem": "3+3?", "reference_answer": "6", "solutions": solutions("It is \\boxed{5}.")},
               {"id": "open1", "problem": "Write a limerick.", "solutions": solutions("There once was a cat.")},
               {"id": "open2", "problem": "Describe the sea.", "solutions": solutions("Blue and wide.")}]
    run_stage(tmp_path, "data.agreement.mode=reference", "data.agreement.min_votes=1", "data.agreement.keep_unreferenced=true",
              records=records, stage="filter")
    filtered = read(tmp_path / "filter-out/kept.jsonl")
    assert [(r["id"], r.get("unverified", False)) for r in filtered] == [("ref", False), ("open1", True), ("open2", True)]
    assert [(r["id"], r["reason"]) for r in read(tmp_path / "filter-out/dropped.jsonl")] == [("wrong", "reference_mismatch")]
    rewards = {r["id"]: direct_reward(reward_path, user(r["problem"]), r["solutions"][0]["text"]) for r in records[2:]}
    threshold = sum(rewards.values()) / 2  # between the two rewards
    run_stage(tmp_path, "data.score.scorer=reward_model", f"data.score.reward_model.model={reward_path}", "data.score.scope=unverified",
              "data.score.reward_model.dtype=float32", f"data.score.threshold={threshold}", records=filtered)
    kept, dropped = read(tmp_path / "out/kept.jsonl"), read(tmp_path / "out/dropped.jsonl")
    high, low = sorted(rewards, key=rewards.get, reverse=True)
    assert sorted(r["id"] for r in kept) == sorted(["ref", high]) and "score" not in next(r for r in kept if r["id"] == "ref")
    assert [(r["id"], r["reason"]) for r in dropped] == [(low, "below_threshold")]


def test_a_reward_model_without_a_classification_head_stops_before_the_teacher_is_asked(tmp_path, tiny_model_path):
    stub = ChatStub()
    try:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
        result = subprocess.run([sys.executable, "-m", "sandlab.launch.cli", "--config-name", "tiny", "data=lumina_general", "stages=[generate,solve,filter,score]",
                                 "teacher=openai_servers", f"teacher.base_urls=[{stub.url}]", "teacher.model=stub", "data.score.scorer=reward_model",
                                 f"data.score.reward_model.model={tiny_model_path}", f"run.dir={tmp_path / 'run'}"],
                                capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    finally:
        stub.close()
    assert result.returncode != 0 and stub.requests == 0
    last = result.stderr.strip().splitlines()[-1]
    assert "has no sequence-classification head" in last and "LlamaForCausalLM" in last and "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.vllm
def test_lumina_demo_end_to_end_with_the_judge_on_the_vllm_engine(tmp_path):
    """The embedded SmolLM2 writes requests and responses and judges them with JSON enforced by vLLM's
    structured outputs: every judgement parses; the report shows the scores and the diversity."""
    import yaml
    from wandb_records import run_summary

    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    result = subprocess.run([sys.executable, "-m", "sandlab.launch.cli", "--config-name", "lumina_demo", f"run.dir={run_dir}",
                             "data.generate.num_problems=6", "data.solve.k=2", "data.solve.sampling.n=2", "data.solve.sampling.max_tokens=96",
                             "stages=[generate,solve,filter,score,diversity,export,report]"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "data/score.json").read_text())
    assert summary["candidates_scored"] >= summary["records_scored"] > 0 and summary["failed_judgements"] == {}
    for rec in read(run_dir / "data/score.jsonl"):
        assert sorted(rec["score_details"]) == sorted(CRITERIA) and all(1 <= v <= 10 for v in rec["score_details"].values())
        assert rec["score"] == max(rec["candidate_scores"]) and rec["solution"] in [s["text"] for s in rec["solutions"]]
    # 40 leaves in the general taxonomy: one per task of every topic.
    taxonomy = yaml.safe_load((ROOT / "data_gen/taxonomies/general.yaml").read_text())
    leaves = sum(len(tasks) for topics in taxonomy["branches"].values() for tasks in topics.values())
    diversity = json.loads((run_dir / "data/diversity.json").read_text())
    assert diversity["coverage"]["leaves_total"] == leaves and 0 < diversity["coverage"]["leaves_hit"] <= diversity["records"]
    report = (run_dir / "report.md").read_text()
    assert "## Quality scores" in report and "## Diversity" in report and (run_dir / "data/diversity.png").stat().st_size > 10_000
    logged = run_summary(run_dir)
    assert "diversity/distinct-2" in logged["summary"] and {"diversity_plot", "diversity_per_leaf"} <= logged["history_keys"]


def test_am_rows_without_a_reference_stay_for_the_reward_model_only_when_asked(tmp_path):
    from sandlab.config import GenerationStage
    from sandlab.data_gen.generate import load_source_problems

    def row(question, reference, test_case=None):
        info = {"source": "x", "reference_answer": reference, "test_case": test_case}
        return {"messages": [{"role": "user", "content": question, "info": info},
                             {"role": "assistant", "content": "<think>t</think>answer", "info": {}}]}

    path = tmp_path / "am.jsonl"
    rows = [row("What is 6 x 7?", "42"), row("Write a haiku about autumn.", None), row("Square it.", None, '{"inputs": [3], "outputs": [9]}')]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    general = GenerationStage(source=str(path), domain="general", source_filter={"reference_answer": None, "test_cases": None})
    assert load_source_problems(general) == []  # a row nothing can verify is no problem by default
    [kept] = load_source_problems(general, keep_unreferenced=True)
    assert kept["problem"] == "Write a haiku about autumn." and kept["reference_answer"] is None and kept["answer_kind"] == "open"
    everything = load_source_problems(GenerationStage(source=str(path)), keep_unreferenced=True)
    assert [p["answer_kind"] for p in everything] == ["math", "open", "code"]
