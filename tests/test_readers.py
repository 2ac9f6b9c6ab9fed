"""Dataset readers (sandlab.readers): every format in tests/fixtures/datasets (written in each dataset's
exact schema; make_fixtures.py there) is detected, keeps its trace in the student's format, renders to
training text with one turn-end token and loss on the completion only, and trains through train/sft.py.
Bad input is one line or a counted drop, never a traceback."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sandlab.config import DataFormat, ReasoningFormat
from sandlab.errors import ConfigError, EmptyDatasetError
from sandlab.readers import FORMATS, READERS, read_records, records_from_rows, split_reasoning

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests/fixtures/datasets"
# fixture file -> (format, records it yields, a piece of the first record's trace, its reference answer)
CASES = {
    "sand_post_training.jsonl": ("sand_post_training", 3, "I need to add 17 and 25", None),
    "sand_math.parquet": ("sand_math", 3, "We compute 100 = 7", "2"),
    "am_distilled.jsonl.zst": ("am_distilled", 3, "six sevens", "42"),
    "openr1_math.jsonl": ("openr1_math", 3, "Subtract 3: 2x = 8", "4"),
    "openthoughts.json": ("openthoughts", 2, "5 squared is 5 times 5", None),
    "openthoughts_metadata.jsonl": ("openthoughts_metadata", 2, "hex means six", "6"),
    "livecodebench_lite.jsonl": ("livecodebench", 6, "", None),  # code problems without traces (tests/test_code_data.py)
    "apps.jsonl": ("apps", 3, "", None),
    "openr1_code.jsonl": ("openr1_code", 2, "", None),
    "messages.jsonl": ("messages", 2, "8 - 5 = 3.", None),
    "prompt_completion.jsonl": ("prompt_completion", 3, "adding 3 gives 3", None),
    "alpaca.jsonl": ("alpaca", 2, "a greeting: bonjour", None),
    "sharegpt.jsonl": ("sharegpt", 2, "4 + 4 = 8.", None),
}
RECORD_FIELDS = {"id", "problem", "reference_answer", "test_cases", "trace", "solution", "source", "prompt", "completion"}


def test_every_format_has_a_fixture_and_a_config_choice():
    assert {fmt for fmt, *_ in CASES.values()} == set(READERS)
    assert [str(m) for m in DataFormat] == list(FORMATS)
    assert [str(m) for m in ReasoningFormat] == ["think", "think_answer"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_auto_detects_and_maps_each_format(name, caplog):
    fmt, count, trace, reference = CASES[name]
    with caplog.at_level("INFO", logger="sandlab.readers"):
        result = read_records(str(FIXTURES / name))
    assert result.format == fmt and f"detected format {fmt}" in caplog.text
    assert len(result.records) == count
    first = result.records[0]
    assert RECORD_FIELDS <= set(first)
    assert trace in first["trace"] and first["reference_answer"] == reference
    assert first["problem"] and first["problem"] == next(m["content"] for m in reversed(first["prompt"]) if m["role"] == "user")
    content = first["completion"][0]["content"]
    assert content == f"<think>\n{first['trace']}\n</think>\n\n{first['solution']}"  # the think format, trace kept
    assert len({r["id"] for r in result.records}) == count
    assert read_records(str(FIXTURES / name)).records[0]["id"] == first["id"]  # stable across reads
    assert read_records(str(FIXTURES / name), format=fmt).records == result.records


def test_format_specific_fields():
    am = read_records(str(FIXTURES / "am_distilled.jsonl.zst")).records
    assert am[0]["source"] == "natural_reasoning" and am[0]["solution"] == "6 * 7 = \\boxed{42}"
    assert am[2]["reference_answer"] is None and json.loads(am[2]["test_cases"]) == {"inputs": [3], "outputs": [9]}
    r1 = read_records(str(FIXTURES / "openr1_math.jsonl"))
    assert [r["id"] for r in r1.records] == ["0b1c7e2a-1111-4a4a-9c9c-000000000001-g0", "0b1c7e2a-1111-4a4a-9c9c-000000000001-g2",
                                             "0b1c7e2a-1111-4a4a-9c9c-000000000003-g0"]  # only Math-Verify-correct generations
    assert [d["reason"] for d in r1.dropped] == ["no_correct_generation"]
    sand = read_records(str(FIXTURES / "sand_post_training.jsonl")).records[0]
    assert sand["prompt"][0]["role"] == "system" and sand["solution"] == "The sum is \\boxed{42}." and "</think>" not in sand["trace"]
    sand_math = read_records(str(FIXTURES / "sand_math.parquet")).records[0]
    assert sand_math["id"] == "sand-math-0" and sand_math["solution"] == "The final answer is $\\boxed{2}$." and sand_math["branch"] == "Number Theory"
    meta = read_records(str(FIXTURES / "openthoughts_metadata.jsonl")).records
    assert meta[1]["test_cases"] and meta[1]["domain"] == "code"
    ot = read_records(str(FIXTURES / "openthoughts.json")).records[0]
    assert "<|begin_of_thought|>" not in ot["completion"][0]["content"] and ot["solution"] == "5^2 = \\boxed{25}"


def test_think_answer_format_rewrites_every_trace():
    for name in CASES:
        for record in read_records(str(FIXTURES / name), reasoning_format="think_answer").records:
            content = record["completion"][0]["content"]
            assert content == f"<think>\n{record['trace']}\n</think>\n<answer>\n{record['solution']}\n</answer>"


@pytest.mark.parametrize("text, trace, answer", [
    ("reasoning\n</think>\nfinal", "reasoning", "final"),  # SAND: no opening tag
    ("<think>\nr\n</think>\n<answer>\na\n</answer>", "r", "a"),  # AM
    ("<|begin_of_thought|>\nr\n<|end_of_thought|>\n\n<|begin_of_solution|>\na\n<|end_of_solution|>", "r", "a"),  # OpenThoughts
    ("<think>r</think>\n\na", "r", "a"),
    ("just an answer", "", "just an answer"),
])
def test_split_reasoning(text, trace, answer):
    assert split_reasoning(text) == (trace, answer)


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_training_text_keeps_the_trace_and_masks_the_prompt(name, tiny_model_path):
    from sandlab.train.formatting import ChatFormat
    from sandlab.train.sft import load_sft_dataset, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_path))
    fmt = ChatFormat.from_tokenizer(tokenizer)
    records = read_records(str(FIXTURES / name)).records
    dataset = load_sft_dataset(str(FIXTURES / name))  # what train/sft.py trains on
    assert len(dataset) == len(records)
    for record, example in zip(records, dataset):
        tok = fmt.tokenize(example["prompt"], example["completion"])
        text = tok["prompt"] + tok["completion"]
        assert record["trace"] in tok["completion"] and record["solution"] in tok["completion"]
        assert tok["completion"].endswith(fmt.turn_end) and tok["completion"].count(fmt.turn_end) == 1
        assert text.count(fmt.turn_end) == tok["prompt"].count(fmt.turn_end) + 1  # one turn end closes the answer
        trained = tokenizer.decode([t for t, m in zip(tok["input_ids"], tok["completion_mask"]) if m])
        masked = tokenizer.decode([t for t, m in zip(tok["input_ids"], tok["completion_mask"]) if not m])
        assert trained == tok["completion"] and masked == tok["prompt"]  # loss on the completion only
        assert tok["completion_mask"] == sorted(tok["completion_mask"])  # prompt tokens first, completion after


def test_sandlab_export_trains_verbatim(tmp_path):
    """sandlab's own prompt/completion JSONL keeps its exact content (even without a trace) as before readers."""
    from sandlab.train.sft import load_sft_dataset

    rows = [{"id": "g-0", "variant": "general", "prompt": [{"role": "user", "content": "Say hi."}],
             "completion": [{"role": "assistant", "content": "Hi!"}]}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_sft_dataset(str(tmp_path))
    assert ds[0]["completion"] == rows[0]["completion"] and ds[0]["prompt"] == rows[0]["prompt"]
    assert load_sft_dataset(str(tmp_path), variants=["general"])[0]["completion"][0]["content"] == "Hi!"
    # asked for the other trace format, it is rewritten like any reader's
    assert load_sft_dataset(str(tmp_path), reasoning_format="think_answer")[0]["completion"][0]["content"] == "<think>\n\n</think>\n<answer>\nHi!\n</answer>"


def test_mix_of_formats(tmp_path):
    from sandlab.train.sft import load_sft_dataset

    ds = load_sft_dataset(str(FIXTURES / "prompt_completion.jsonl"), mix=[str(FIXTURES / "am_distilled.jsonl.zst"), str(FIXTURES / "sand_math.parquet")])
    assert len(ds) == 9 and ds.column_names == ["prompt", "completion"]


def test_unknown_format_is_one_line(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"question": "q", "reply": "a"}) + "\n")
    with pytest.raises(ConfigError) as err:
        read_records(str(path))
    message = str(err.value)
    assert "\n" not in message and "fields seen: ['question', 'reply']" in message
    assert all(name in message for name in READERS)
    with pytest.raises(ConfigError, match=r"unknown data.format='nope'; known formats: auto, am_distilled"):
        read_records(str(path), format="nope")


def test_missing_fields_are_dropped_and_counted(caplog):
    rows = [
        {"id": "a", "problem": "What is 1+1?", "solution": "1+1 = $\\boxed{2}$", "branch": "Arithmetic", "difficulty_rating": 1},
        {"id": "b", "problem": "No solution here", "solution": None, "branch": "Arithmetic", "difficulty_rating": 1},
        {"id": "c", "problem": "Unboxed", "solution": "it is two", "branch": "Arithmetic", "difficulty_rating": 1},
        "not a row",
    ]
    with caplog.at_level("WARNING", logger="sandlab.readers"):
        result = records_from_rows(rows)
    assert result.format == "sand_math" and [r["id"] for r in result.records] == ["a"]
    assert [(d.get("id"), d["reason"]) for d in result.dropped] == [("b", "missing_solution"), ("c", "no_boxed_answer"), (None, "not_an_object")]
    assert "dropped 3 of 4 rows" in caplog.text
    malformed = records_from_rows([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
                                   {"messages": [{"role": "user", "content": "q"}]}], "messages")
    assert len(malformed.records) == 1 and malformed.dropped[0]["reason"] == "no_assistant_turn"


def test_a_dataset_without_usable_rows_stops_before_training(tmp_path):
    from sandlab.train.sft import load_sft_dataset

    path = tmp_path / "r1.jsonl"
    path.write_text(json.dumps({"problem": "p", "generations": ["<think>x</think>1"], "correctness_math_verify": [False], "uuid": "u"}) + "\n")
    with pytest.raises(EmptyDatasetError, match=r"yields no training rows; dropped rows: \{'no_correct_generation': 1\}"):
        load_sft_dataset(str(path))


def test_zst_without_zstandard_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(ConfigError, match=r"am_distilled.jsonl.zst is zstd-compressed; reading it needs zstandard: pip install zstandard$"):
        read_records(str(FIXTURES / "am_distilled.jsonl.zst"))


def test_a_missing_local_path_is_one_line():
    with pytest.raises(ConfigError, match="does not exist"):
        read_records("./no/such/file.jsonl")


@pytest.mark.slow
def test_every_format_trains_through_sft(tmp_path):
    """One train/sft.py run on a mix of every fixture, each entry in its own format (auto-detected): TRL
    renders and tokenizes every row of every format, then takes a training step."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    env.pop("WANDB_API_KEY", None)
    run_dir = tmp_path / "run"
    first, *rest = sorted(CASES)
    result = subprocess.run([sys.executable, "train/sft.py", "--config-name", "tiny", "data=from_file", f"data.dataset_path={FIXTURES / first}",
                             f"data.mix=[{','.join(str(FIXTURES / name) for name in rest)}]", "stages=[train]", "train.trl.max_steps=1",
                             f"run.dir={run_dir}"], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "checkpoints/final/model.safetensors").exists()
    metrics = json.loads((run_dir / "checkpoints/final/train_metrics.json").read_text())
    assert metrics["global_step"] == 1 and metrics["final_loss"] is not None
    output = result.stdout + result.stderr
    for name, (fmt, count, _, _) in CASES.items():
        if fmt != "prompt_completion":  # sandlab's own export is trained on verbatim, without a reader
            assert re.search(rf"SFT dataset \S*{re.escape(name)}: {count} rows in format {fmt}\b", output), name


def test_distillation_sources_read_any_format(tmp_path):
    from sandlab.config import GenerationStage
    from sandlab.data_gen.generate import load_source_problems

    sand = load_source_problems(GenerationStage(source=str(FIXTURES / "sand_math.parquet")))
    assert [(r["id"], r["reference_answer"]) for r in sand] == [("sand-math-0", "2"), ("sand-math-1", "1"), ("sand-math-2", "6")]
    assert sand[0]["problem"] == "Find the remainder when 100 is divided by 7." and sand[0]["answer_kind"] == "math"
    am = load_source_problems(GenerationStage(source=str(FIXTURES / "am_distilled.jsonl.zst")))
    assert [r["reference_answer"] for r in am] == ["42", "1024", None] and "outputs" in am[2]["test_cases"]
    r1 = load_source_problems(GenerationStage(source=str(FIXTURES / "openr1_math.jsonl"), source_format="openr1_math"))
    assert [r["problem"] for r in r1] == ["Solve for x: 2x + 3 = 11.", "Compute 12 / 4."]  # one per problem, verified ones only
    # rows named by problem_field/answer_field keep working as before readers
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"question": "1+1?", "gold": "2", "source": "x"}) + "\n")
    legacy = load_source_problems(GenerationStage(source=str(plain), problem_field="question", answer_field="gold"))
    assert [(r["problem"], r["reference_answer"]) for r in legacy] == [("1+1?", "2")]
    export = load_source_problems(GenerationStage(source=str(FIXTURES / "prompt_completion.jsonl"), answer_field="id"))
    assert export[0]["problem"] == "What is 7*0+3?"  # an SFT export row: the problem is its last user turn
    with pytest.raises(ConfigError, match=r"^data.generate.source=.*unknown dataset format \(fields seen: \['question'\]\)"):
        (tmp_path / "odd.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
        load_source_problems(GenerationStage(source=str(tmp_path / "odd.jsonl")))
    with pytest.raises(ConfigError, match="^data.generate.source: dataset './nope.jsonl' does not exist"):
        load_source_problems(GenerationStage(source="./nope.jsonl"))


def test_mix_entries_pick_format_variant_count_and_filter():
    from sandlab.train.sft import load_sft_dataset

    base = str(FIXTURES / "prompt_completion.jsonl")
    ds = load_sft_dataset(base, mix=[
        {"path": str(FIXTURES / "openr1_math.jsonl"), "format": "openr1_math", "variant": "math", "filter": {"source": ["olympiads"]}},
        {"path": str(FIXTURES / "am_distilled.jsonl.zst"), "count": 2, "variant": "distill"},
        {"path": str(FIXTURES / "sand_math.parquet"), "fraction": 0.5, "variant": "math"},
        str(FIXTURES / "sharegpt.jsonl"),  # a plain string entry, as before
    ])
    assert len(ds) == 3 + 2 + 2 + 2 + 2  # olympiads: both correct generations of its one problem
    assert ds.column_names == ["prompt", "completion"]
    selected = load_sft_dataset(base, variants=["distill"], mix=[{"path": str(FIXTURES / "am_distilled.jsonl.zst"), "count": 2, "variant": "distill"}])
    assert len(selected) == 2 and all("<think>\n" in ex["completion"][0]["content"] for ex in selected)
    verified = load_sft_dataset(str(FIXTURES / "openr1_math.jsonl"), mix=[{"path": base, "filter": {"variant": "math"}}])
    assert len(verified) == 3 + 3
    with pytest.raises(EmptyDatasetError, match=r"dropped rows: \{'filtered': 3\}"):
        load_sft_dataset(base, mix=[{"path": str(FIXTURES / "sand_math.parquet"), "filter": {"branch": "Geometry"}}])
    for entry, message in [({"path": base, "cnt": 1}, "unknown keys \\['cnt'\\]"), ({"path": base, "count": 1, "fraction": 0.5}, "both count and fraction"),
                           ({"format": "alpaca"}, "needs a path"), ({"path": base, "format": "csv"}, "unknown format='csv'; known formats: auto")]:
        with pytest.raises(ConfigError, match=message):
            load_sft_dataset(base, mix=[entry])


def test_standalone_stage_input_reads_any_format(tmp_path):
    from sandlab.readers import read_stage_input

    records = [{"id": "r-1", "problem": "What is 2+2?", "solution": "4", "branch": "Arithmetic"}]  # a sandlab record: as it is
    (tmp_path / "in.jsonl").write_text(json.dumps(records[0]) + "\n")
    assert read_stage_input(str(tmp_path / "in.jsonl")) == records
    am = read_stage_input(str(FIXTURES / "am_distilled.jsonl.zst"))
    assert len(am) == 3 and all(r["id"] and r["problem"] for r in am)
    sand = read_stage_input(str(FIXTURES / "sand_math.parquet"), "sand_math")
    assert sand[0]["reference_answer"] == "2" and sand[0]["id"] == "sand-math-0"
