"""Code problems as data: every test format normalized to TestCases (expectations written out by
hand), the LiveCodeBench / APPS / open-r1 readers on their fixtures, code sources in distillation
mode, ``data.agreement.mode=tests`` with the real sandboxed verifier, and the ``code`` export."""

import base64
import json
import os
import pickle
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from chat_stub import ChatStub, prompt_of

from sandlab.config import AgreementStage, ExportStage, GenerationStage
from sandlab.data_gen.agreement import filter_by_tests
from sandlab.data_gen.export import to_sft_example
from sandlab.data_gen.generate import load_source_problems
from sandlab.errors import ConfigError
from sandlab.readers import read_records, records_from_rows
from sandlab.verification import CodeVerifier, TestCase
from sandlab.verification.testcases import decode_lcb_private, encode_lcb_private, normalize_tests

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "datasets"
LCB = FIXTURES / "livecodebench_lite.jsonl"
LCB_FIELDS = {"question_title", "question_content", "platform", "question_id", "contest_id", "contest_date", "starter_code", "difficulty",
              "public_test_cases", "private_test_cases", "metadata"}


def lcb_rows() -> list[dict]:
    return [json.loads(line) for line in LCB.read_text().splitlines()]


def lcb_row(question_id: str) -> dict:
    return next(r for r in lcb_rows() if r["question_id"] == question_id)


# ---- the LiveCodeBench fixture keeps the dataset's exact format --------------------------------------
def test_livecodebench_fixture_is_code_generation_lite():
    rows = lcb_rows()
    assert len(rows) == 6 and all(set(r) == LCB_FIELDS for r in rows)
    assert {r["platform"] for r in rows} == {"atcoder", "codeforces", "leetcode"}
    assert {r["difficulty"] for r in rows} == {"easy", "medium", "hard"}
    assert min(r["contest_date"] for r in rows) >= "2024-08" and max(r["contest_date"] for r in rows) < "2025-04"
    for r in rows:
        public = json.loads(r["public_test_cases"])
        private = json.loads(pickle.loads(zlib.decompress(base64.b64decode(r["private_test_cases"]))))  # LiveCodeBench's own decoding
        functional = r["platform"] == "leetcode"
        assert {t["testtype"] for t in public + private} == {"functional" if functional else "stdin"}
        assert ("func_name" in json.loads(r["metadata"])) == functional
        assert r["starter_code"].startswith("class Solution:") == functional


def test_decode_lcb_private_reads_both_encodings():
    tests = [{"input": "1\n", "output": "2\n", "testtype": "stdin"}]
    assert decode_lcb_private(encode_lcb_private(tests)) == tests
    assert decode_lcb_private(json.dumps(tests)) == tests
    assert decode_lcb_private("") == []
    evil = base64.b64encode(zlib.compress(pickle.dumps(print))).decode()  # a pickle naming a global is refused
    with pytest.raises(ConfigError, match=r"^q1: private_test_cases is neither JSON nor base64\(zlib\(pickle\(JSON\)\)\) \(UnpicklingError\)$"):
        decode_lcb_private(evil, where="q1")


# ---- every format normalizes as written out here ---------------------------------------------------------
def test_livecodebench_stdin_row():
    assert normalize_tests(lcb_row("abc370_a"), where="abc370_a") == ([
        TestCase("3\n1 2 3\n", "6\n"), TestCase("2\n-5 5\n", "0\n"),
        TestCase("1\n1000\n", "1000\n"), TestCase("4\n-1 -2 -3 -4\n", "-10\n"), TestCase("5\n10 20 30 40 50\n", "150\n"),
    ], None)


def test_livecodebench_functional_row_takes_func_name_from_metadata():
    assert normalize_tests(lcb_row("3305")) == ([
        TestCase("[1, 2, 3, 4, 3]\n6", "2", "functional"), TestCase("[1, 1, 1]\n2", "3", "functional"),
        TestCase("[5]\n10", "0", "functional"), TestCase("[-1, 1, 0, 0]\n0", "2", "functional"), TestCase("[2, 2, 2, 2]\n4", "6", "functional"),
    ], "countPairs")
    # the public tests alone (a JSON string) with the metadata's name given
    assert normalize_tests(lcb_row("3412")["public_test_cases"], "longestRun") == (
        [TestCase('"aabbbc"', "3", "functional"), TestCase('"z"', "1", "functional")], "longestRun")
    # the private string alone is recognised as LiveCodeBench's encoding
    assert normalize_tests(lcb_row("3480")["private_test_cases"], "maxSubarraySum")[0] == [
        TestCase("[5]", "5", "functional"), TestCase("[1, 2, 3]", "6", "functional"), TestCase("[2, -1, 2, -5, 3]", "3", "functional")]


def test_openr1_verification_info():
    info = {"language": "python", "test_cases": [{"input": "3\n", "output": "9\n", "type": "stdin_stdout"},
                                                 {"input": "-4\n", "output": "16\n", "type": "stdin_stdout", "fn_name": None}]}
    assert normalize_tests(json.dumps(info)) == ([TestCase("3\n", "9\n"), TestCase("-4\n", "16\n")], None)
    calls = {"language": "python", "test_cases": [{"input": '"hello"', "output": "2", "type": "function_call", "fn_name": "count_vowels"},
                                                  {"input": ["ab", 2], "output": "[1]", "type": "function_call", "fn_name": "count_vowels"}]}
    assert normalize_tests(calls) == ([TestCase('"hello"', "2", "functional", True), TestCase('"ab"\n2', "[1]", "functional", True)], "count_vowels")


def test_apps_taco_input_output():
    call_based = json.dumps({"fn_name": "add", "inputs": [[1, 2], ["x", [3]]], "outputs": [[3], ["y"]]})
    assert normalize_tests(call_based) == ([TestCase("1\n2", "[3]", "functional", True), TestCase('"x"\n[3]', '["y"]', "functional", True)], "add")
    assert normalize_tests({"inputs": [["hello world"]], "outputs": ["world hello"]}, "reverse_words") == (
        [TestCase('"hello world"', '"world hello"', "functional", True)], "reverse_words")
    lines = {"inputs": [["2", "3", "4"], "5\n"], "outputs": [["6", "8"], "10\n"]}
    assert normalize_tests(lines) == ([TestCase("2\n3\n4", "6\n8"), TestCase("5\n", "10\n")], None)


def test_am_test_case_string_and_normalized_lists():
    assert normalize_tests('{"inputs": [3], "outputs": [9]}') == ([TestCase("3", "9")], None)
    assert normalize_tests([{"input": "1\n", "output": "1\n", "testtype": "stdin"}]) == ([TestCase("1\n", "1\n")], None)
    assert normalize_tests([{"input": "[1]", "output": "[1]", "testtype": "functional", "unwrap": True}], "f") == (
        [TestCase("[1]", "[1]", "functional", True)], "f")
    program = [{"input": "assert f(1) == 2", "testtype": "program"}]
    assert normalize_tests(program) == ([TestCase("assert f(1) == 2", "", "program")], None)


@pytest.mark.parametrize("raw, fn_name, message", [
    ("{not json", None, r"tests are not valid JSON \(Expecting property name enclosed in double quotes at char 1\)"),
    ({"inputs": ["1", "2"], "outputs": ["1"]}, None, r"2 inputs but 1 outputs"),
    ({"inputs": "1", "outputs": "1"}, None, r"inputs and outputs must be lists"),
    ({"fn_name": "f", "inputs": [5], "outputs": [5]}, None, r"call-based input 1 must be a list of arguments, got int"),
    ({"fn_name": "f", "inputs": [[1]], "outputs": [1]}, "g", r"the tests call 'f' but the problem names 'g'"),
    ([{"input": "1", "output": "1", "testtype": "functional"}], None, r"functional tests but no function name \(fn_name / metadata.func_name\)"),
    ([{"input": "1", "output": "1", "testtype": "unit"}], None, r"test 1 has testtype 'unit', not one of stdin, functional, program"),
    ([{"input": "x y", "output": "1", "testtype": "functional"}], "f", r"test 1 input line 1 'x y' is not a JSON argument"),
    ([{"input": "1", "output": "one", "testtype": "functional"}], "f", r"test 1 output 'one' is not JSON"),
    ([{"output": "1"}], None, r"test 1 has no input"),
    ([{"input": "1", "output": "1", "type": "checker"}], None, r"test 1 has type 'checker', not one of stdin_stdout, function_call"),
    ([{"input": "1", "output": "1", "testtype": "stdin"}, {"input": "1", "output": "1", "testtype": "functional"}], "f", r"mixes stdin and functional tests"),
    ({"language": "cpp", "test_cases": []}, None, r"tests are for language 'cpp', not python"),
    ([], None, r"has no tests"),
    (None, None, r"has no tests"),
    ({"tests": 1}, None, r"unknown test format \(dict with keys \['tests'\]\)"),
    ({"public_test_cases": "[]", "private_test_cases": "!!!", "metadata": "{}"}, None, r"private_test_cases is neither JSON nor base64"),
])
def test_malformed_tests_are_one_line_naming_the_record(raw, fn_name, message):
    with pytest.raises(ConfigError) as info:
        normalize_tests(raw, fn_name, where="rec-7")
    text = str(info.value)
    assert "\n" not in text and re.match(rf"^rec-7: {message}", text), text


# ---- readers --------------------------------------------------------------------------------------------
def test_readers_detect_and_read_the_code_fixtures():
    lcb = read_records(str(LCB))
    assert lcb.format == "livecodebench" and not lcb.dropped
    assert [(r["id"], r["fn_name"], r["difficulty"], r["platform"]) for r in lcb.records] == [
        ("abc370_a", None, "easy", "atcoder"), ("2010_B", None, "medium", "codeforces"), ("abc388_c", None, "hard", "atcoder"),
        ("3305", "countPairs", "easy", "leetcode"), ("3412", "longestRun", "medium", "leetcode"), ("3480", "maxSubarraySum", "hard", "leetcode")]
    first, leet = lcb.records[0], lcb.records[3]
    assert first["answer_kind"] == "code" and first["contest_date"] == "2024-08-10T00:00:00" and first["starter_code"] == ""
    assert first["tests"][0] == {"input": "3\n1 2 3\n", "output": "6\n", "testtype": "stdin", "unwrap": False} and len(first["tests"]) == 5
    assert "Read the input from stdin" in first["problem"] and first["problem"].startswith("You are given N integers")
    assert "class Solution:\n    def countPairs(self, nums: List[int], target: int) -> int:\n```" in leet["problem"]
    assert "stdin" not in leet["problem"] and leet["trace"] == "" and leet["prompt"] == [{"role": "user", "content": leet["problem"]}]

    apps = read_records(str(FIXTURES / "apps.jsonl"))
    assert apps.format == "apps" and [(r["id"], r["fn_name"], r["platform"], r["difficulty"]) for r in apps.records] == [
        ("apps-4001", None, "codeforces", "introductory"), ("apps-4002", "reverse_words", "codewars", "introductory"),
        ("apps-4003", None, "codeforces", "interview")]
    assert apps.records[1]["tests"] == [{"input": '"hello world"', "output": '["world hello"]', "testtype": "functional", "unwrap": True},
                                        {"input": '"a b c"', "output": '["c b a"]', "testtype": "functional", "unwrap": True}]
    assert "def reverse_words(s):" in apps.records[1]["problem"]

    openr1 = read_records(str(FIXTURES / "openr1_code.jsonl"))
    assert openr1.format == "openr1_code" and [(r["id"], r["fn_name"]) for r in openr1.records] == [("openr1-code-1", None), ("openr1-code-2", "count_vowels")]
    assert openr1.records[0]["tests"] == [{"input": "3\n", "output": "9\n", "testtype": "stdin", "unwrap": False},
                                          {"input": "-4\n", "output": "16\n", "testtype": "stdin", "unwrap": False}]
    assert openr1.records[0]["problem"] == "Read an integer n and print n squared."

    am = read_records(str(FIXTURES / "am_distilled.jsonl.zst")).records
    assert [r.get("answer_kind") for r in am] == [None, None, "code"]
    assert am[2]["tests"] == [{"input": "3", "output": "9", "testtype": "stdin", "unwrap": False}] and am[2]["fn_name"] is None


def test_a_row_with_malformed_tests_is_dropped_with_the_reason():
    row = {**lcb_row("3305"), "public_test_cases": '[{"input": "[1]", "output": "1", "testtype": "functional"}]', "metadata": "{}", "private_test_cases": ""}
    result = records_from_rows([lcb_row("abc370_a"), row], "livecodebench")
    assert len(result.records) == 1 and [d["reason"] for d in result.dropped] == [
        "malformed_tests: livecodebench question 3305: functional tests but no function name (fn_name / metadata.func_name)"]
    # an AM row keeps its trace for SFT; only its tests are unusable
    am = {"id": "am-1", "messages": [{"role": "user", "content": "Write f.", "info": {"test_case": "{\"inputs\": [1, 2], \"outputs\": [1]}"}},
                                     {"role": "assistant", "content": "<think>\nx\n</think>\n<answer>\ncode\n</answer>", "info": {}}]}
    (record,) = records_from_rows([am], "am_distilled").records
    assert "answer_kind" not in record and record["test_cases"] and record["solution"] == "code"


def test_code_sources_become_code_problems():
    problems = load_source_problems(GenerationStage(source=str(LCB), domain="code"))
    assert len(problems) == 6 and {p["answer_kind"] for p in problems} == {"code"}
    p = problems[3]
    assert (p["id"], p["fn_name"], p["platform"], p["difficulty"], p["contest_date"]) == ("3305", "countPairs", "leetcode", "easy", "2024-09-01T00:00:00")
    assert p["reference_answer"] is None and p["starter_code"].startswith("class Solution:") and len(p["tests"]) == 5
    # AM mixes math and code: source_filter keeps its code rows
    am = load_source_problems(GenerationStage(source=str(FIXTURES / "am_distilled.jsonl.zst"), source_filter={"answer_kind": "code"}))
    assert [(p["answer_kind"], p["tests"]) for p in am] == [("code", [{"input": "3", "output": "9", "testtype": "stdin", "unwrap": False}])]


# ---- data.agreement.mode=tests with the real verifier --------------------------------------------------------
RIGHT = "Count every pair once.\n```python\nclass Solution:\n    def countPairs(self, nums, target):\n" \
        "        return sum(nums[i] + nums[j] == target for i in range(len(nums)) for j in range(i + 1, len(nums)))\n```"
WRONG = "Count ordered pairs.\n```python\nclass Solution:\n    def countPairs(self, nums, target):\n" \
        "        return sum(a + b == target for a in nums for b in nums)\n```"


def solved(rec_id: str, *texts: str, finish: str = "stop") -> dict:
    problem = next(p for p in load_source_problems(GenerationStage(source=str(LCB))) if p["id"] == "3305")
    return {**problem, "id": rec_id, "solutions": [{"text": t, "answer": None, "finish_reason": finish} for t in texts]}


@pytest.fixture(scope="module")
def verifier():
    with CodeVerifier(workers=2, timeout_s=5, memory_mb=512) as v:
        yield v


def test_tests_mode_keeps_a_problem_with_a_passing_solution(verifier):
    records = [solved("both", WRONG, RIGHT), solved("wrong", WRONG, WRONG), solved("none", "I cannot write code."), solved("cut", RIGHT, finish="length")]
    kept, dropped = filter_by_tests(records, AgreementStage(mode="tests", min_votes=1), verifier)
    assert [(r["id"], r["verified"], r["total_votes"], r["answer"]) for r in kept] == [("both", 1, 2, None)]
    assert kept[0]["solution"] == RIGHT and kept[0]["agreement"] == 0.5
    assert [s["verification"]["passed"] for s in kept[0]["solutions"]] == [False, True]
    assert [(d["id"], d["reason"], d["verified"]) for d in dropped] == [("wrong", "tests_failed", 0), ("none", "tests_failed", 0), ("cut", "tests_failed", 0)]
    # min_votes: two passing solutions needed
    kept, dropped = filter_by_tests([solved("both", WRONG, RIGHT), solved("twice", RIGHT, RIGHT)], AgreementStage(mode="tests", min_votes=2), verifier)
    assert [r["id"] for r in kept] == ["twice"] and [(d["id"], d["reason"]) for d in dropped] == [("both", "tests_failed")]


def test_tests_mode_drops_records_without_usable_tests(verifier):
    no_tests = {"id": "math", "problem": "1+1?", "solutions": [{"text": RIGHT, "finish_reason": "stop"}]}
    bad = {**solved("bad", RIGHT), "tests": [{"input": "[1]", "output": "1", "testtype": "functional"}], "fn_name": None}
    kept, dropped = filter_by_tests([no_tests, bad], AgreementStage(mode="tests", min_votes=1), verifier)
    assert not kept and [(d["id"], d["reason"]) for d in dropped] == [("math", "no_tests"), ("bad", "malformed_tests")]
    assert dropped[1]["detail"] == "record bad: functional tests but no function name (fn_name / metadata.func_name)"


def test_a_sandbox_failure_is_no_fail(monkeypatch, verifier):
    """Sandboxes that cannot start (bubblewrap replaced by /bin/false): infra_error, not tests_failed."""
    original = verifier.sandbox.command

    def broken(*args, **kwargs):
        argv, path = original(*args, **kwargs)
        return ["/bin/false", *argv[1:]], path

    monkeypatch.setattr(verifier.sandbox, "command", broken)
    kept, dropped = filter_by_tests([solved("infra", RIGHT, WRONG)], AgreementStage(mode="tests", min_votes=1), verifier)
    assert not kept and [(d["id"], d["reason"], d["verified"], d["infra_errors"]) for d in dropped] == [("infra", "infra_error", 0, 2)]


def test_code_export_has_no_boxed_answer_and_keeps_its_tests():
    rec = {**solved("x", RIGHT), "solution": RIGHT, "answer": None}
    row = to_sft_example(rec, ExportStage(variant="math", system_prompt=""))
    assert row["variant"] == "code" and row["completion"] == [{"role": "assistant", "content": RIGHT}] and "boxed" not in RIGHT
    assert row["answer_kind"] == "code" and row["fn_name"] == "countPairs" and len(row["tests"]) == 5


# ---- the recipe end to end with a scripted teacher -----------------------------------------------------------
def code_teacher(body: dict) -> list[str]:
    """Right on "Sum of Integers", a wrong program for every other problem."""
    name, fields = prompt_of(body)
    assert name == "solve_code", name
    n = body.get("n", 1)
    if fields["problem"].startswith("You are given N integers A_1, A_2"):
        return ["Sum them.\n```python\ninput()\nprint(sum(map(int, input().split())))\n```"] * n
    return ["Guess.\n```python\nprint(0)\n```"] * n


def test_am_code_distill_recipe_keeps_the_problem_whose_code_passes(tmp_path):
    stub = ChatStub(code_teacher)
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    try:
        result = subprocess.run([sys.executable, "data_gen/run.py", "--config-name", "am_code_distill", f"teacher.base_urls=[{stub.url}]",
                                 "teacher.model=stub", f"data.generate.source={LCB}", "data.generate.source_filter=null", "data.generate.source_limit=3",
                                 "data.solve.k=2", "data.solve.sampling.n=2", "verify.workers=2", "stages=[generate,solve,filter,export]",
                                 f"run.dir={run_dir}"], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    finally:
        stub.close()
    assert result.returncode == 0, result.stderr[-3000:]
    sft = [json.loads(line) for line in (run_dir / "sft/train.jsonl").read_text().splitlines()]
    assert [(r["id"], r["variant"], r["answer"]) for r in sft] == [("abc370_a", "code", None)]
    assert sft[0]["completion"][0]["content"].startswith("Sum them.") and "boxed" not in sft[0]["completion"][0]["content"]
    assert (run_dir / "sft/code/train.jsonl").exists()
    dropped = [json.loads(line) for line in (run_dir / "data/filter.dropped.jsonl").read_text().splitlines()]
    assert [(d["id"], d["reason"], d["verified"], d["total_votes"]) for d in dropped] == [("2010_B", "tests_failed", 0, 2), ("abc388_c", "tests_failed", 0, 2)]
    solved_rows = [json.loads(line) for line in (run_dir / "data/solve.jsonl").read_text().splitlines()]
    assert all(s["answer"] is None for r in solved_rows for s in r["solutions"])
