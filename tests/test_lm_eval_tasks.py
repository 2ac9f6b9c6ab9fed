"""The lm-eval task YAMLs in eval/lm_eval against sandlab's own harness: both drive the same
OpenAI-compatible server (a scripted model that is right on some samples and wrong on others, by a
hash of the exact prompt text and the sample's index), and must send the same prompts and give the same per-sample grades,
for both protocols and across repeats."""

import collections
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from chat_stub import ChatStub

from sandlab.benchmarks import load_benchmark
from sandlab.eval.harness import gold_of, render_prompt

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SANDLAB_BENCHMARK_DIR") or ROOT.parent / "shared" / "benchmarks")
SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
LIMIT = 4
PROTOCOLS = {"paper": "correct_first", "standard": "shuffled"}
pytestmark = pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/benchmarks")


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
        key, n = (user, body.get("temperature")), body.get("n", 1)
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


def test_lm_eval_tasks_and_own_harness_give_the_same_grades(tmp_path):
    respond, seen = make_model()
    stub = ChatStub(respond)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SANDLAB_BENCHMARK_DIR": str(SHARED), "WANDB_MODE": "disabled"}
    try:
        ours = {}
        for protocol in PROTOCOLS:
            run = tmp_path / f"own-{protocol}"
            result = subprocess.run([sys.executable, "eval/run.py", "--config-name", "tiny", f"eval={protocol}", "eval.backend.backend=openai",
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
                                 "--apply_chat_template", "--system_instruction", SYSTEM, "--include_path", "eval/lm_eval", "--tasks", tasks,
                                 "--limit", str(LIMIT), "--log_samples", "--output_path", str(out)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    finally:
        stub.close()
    assert seen == own_prompts  # the same user messages, as many samples each (lm-eval sends one request per repeat, sandlab one with n)
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
        assert repeats == len(grades) == {("paper", "math500"): 1, ("paper", "gpqa_diamond"): 1, ("standard", "math500"): 4, ("standard", "gpqa_diamond"): 8}[key[:2]]
        assert row["pass@1"] == pytest.approx(sum(grades) / len(grades)), key  # mean over all repeats, not the first
    outcomes = [g for grades in ours.values() for g in grades]
    assert any(outcomes) and not all(outcomes)  # a mix of right and wrong, so agreement means something
    assert any(row["pass@1"] != row["first_sample"] for row in theirs.values())  # the mean covers every repeat
