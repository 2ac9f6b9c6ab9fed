"""Training text keeps the reasoning trace under any chat template, loss is on the completion only, and
eos is one token across tokenizer, generation config and data. Uses the original
DeepSeek-R1-Distill-Qwen template from ../shared/fixtures on a tiny R1-style tokenizer/model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sandlab.config import TrainConfig
from sandlab.errors import ConfigError
from sandlab.train.formatting import ChatFormat

ROOT = Path(__file__).resolve().parents[1]
R1_TEMPLATE = Path(os.environ.get("SANDLAB_SHARED_DIR") or ROOT.parent / "shared") / "fixtures/chat_templates/deepseek-r1-distill-qwen.jinja"
TRACE = "<think>\nFirst, 17 + 25: 17 + 20 = 37, then 37 + 5 = 42.\n</think>\n\nThe sum is \\boxed{42}."
PROMPT = [{"role": "system", "content": "Reason step by step."}, {"role": "user", "content": "What is 17 + 25?"}]
COMPLETION = [{"role": "assistant", "content": TRACE}]
needs_fixture = pytest.mark.skipif(not R1_TEMPLATE.exists(), reason="needs ../shared/fixtures")
CPU_TRL = {"bf16": False, "gradient_checkpointing": False, "save_strategy": "no", "use_cpu": True}  # trl.SFTConfig settings for CPU runs


@pytest.fixture(scope="module")
def r1_model(tiny_model_path, tmp_path_factory):
    """A tiny random model with an R1-style tokenizer: R1's special tokens, a BOS the tokenizer adds
    itself, and the original template (which strips <think> text from assistant turns)."""
    import torch
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    tok.add_special_tokens({"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>",
                            "additional_special_tokens": ["<｜User｜>", "<｜Assistant｜>"]})
    bos = tok.bos_token
    tok.backend_tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.bos_token_id)])
    tok.chat_template = R1_TEMPLATE.read_text()
    path = tmp_path_factory.mktemp("r1-tiny")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@needs_fixture
def test_r1_template_would_drop_the_trace_but_training_text_keeps_it(r1_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(r1_model)
    assert "17 + 20" not in tok.apply_chat_template(PROMPT + COMPLETION, tokenize=False)  # the hazard
    fmt = ChatFormat.from_tokenizer(tok)
    assert fmt.turn_end == "<｜end▁of▁sentence｜>" and not fmt.template_keeps_trace
    sample = fmt.tokenize(PROMPT, COMPLETION)
    ids, mask = sample["input_ids"], sample["completion_mask"]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id  # template BOS + tokenizer BOS = one
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == TRACE + "<｜end▁of▁sentence｜>"
    assert tok.decode(ids[: sample["prompt_tokens"]]).endswith("What is 17 + 25?<｜Assistant｜>")
    assert ids[-1] == tok.eos_token_id and mask[-1] == 1  # the model learns to stop


def test_chatml_turn_end_and_broken_templates(tiny_model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    fmt = ChatFormat.from_tokenizer(tok)
    assert fmt.turn_end == "<|im_end|>" and fmt.template_keeps_trace and not fmt.strip_bos
    assert fmt.render(PROMPT, COMPLETION)["completion"] == TRACE + "<|im_end|>"
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ConfigError, match="ends an assistant turn"):
        ChatFormat.from_tokenizer(tok)
    tok.chat_template = "{{ messages[0]['content'] }}"
    with pytest.raises(ConfigError, match="does not render assistant messages"):
        ChatFormat.from_tokenizer(tok)


@pytest.mark.slow
@needs_fixture
def test_trainer_sees_what_inspection_shows_and_checkpoint_eos_is_consistent(r1_model, tmp_path):
    """TRL's tokenized training rows equal ChatFormat.tokenize (what the inspection command prints);
    after training, tokenizer, generation config and data share the eos; the template is saved."""
    from transformers import AutoTokenizer, GenerationConfig

    from sandlab.train.sft import build_sft_trainer

    data = tmp_path / "train.jsonl"
    rows = [{"prompt": PROMPT, "completion": COMPLETION}, {"prompt": PROMPT[1:], "completion": [{"role": "assistant", "content": "<think>x</think>y"}]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig(per_device_train_batch_size=2, num_processes=1, global_batch_size=2, attn_implementation="sdpa",
                      trl={**CPU_TRL, "max_steps": 1, "max_length": 256})
    out = tmp_path / "out"
    trainer = build_sft_trainer(str(r1_model), str(data), cfg, output_dir=str(out), run_name="t", seed=0, report_to=[])
    fmt = ChatFormat.from_tokenizer(AutoTokenizer.from_pretrained(r1_model))
    for row, seen in zip(rows, trainer.train_dataset):
        expected = fmt.tokenize(row["prompt"], row["completion"], cfg.trl["max_length"])
        labels = [i if m else -100 for i, m in zip(expected["input_ids"], expected["completion_mask"])]
        assert seen["input_ids"] == expected["input_ids"] and seen["labels"] == labels
    trainer.train()
    trainer.save_model(str(out))
    trainer.processing_class.save_pretrained(str(out))
    saved = AutoTokenizer.from_pretrained(out)
    eos_ids = GenerationConfig.from_pretrained(out).eos_token_id
    assert saved.eos_token == "<｜end▁of▁sentence｜>"
    assert saved.eos_token_id in (eos_ids if isinstance(eos_ids, list) else [eos_ids])
    assert GenerationConfig.from_pretrained(out).pad_token_id == saved.pad_token_id is not None
    assert saved.chat_template == R1_TEMPLATE.read_text()


@pytest.mark.slow
@needs_fixture
def test_inspect_command_shows_mask_counts_and_truncation(r1_model, tmp_path):
    data = tmp_path / "train.jsonl"
    long_trace = "<think>" + " step" * 400 + "</think>\\boxed{1}"
    rows = [{"prompt": PROMPT, "completion": COMPLETION}] * 3 + [{"prompt": PROMPT, "completion": [{"role": "assistant", "content": long_trace}]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "train/inspect_data.py", "--config-name", "tiny", f"model.path={r1_model}", f"data.dataset_path={data}",
                             "train.trl.max_length=128", "--samples", "1"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "17 + 20 = 37" in out and "green = trained on" in out
    assert "truncated_share" in out and "0.2500" in out  # 1 of 4 samples is longer than 128 tokens
    bad = subprocess.run([sys.executable, "train/inspect_data.py", "--config-name", "tiny", f"data.dataset_path={tmp_path / 'missing.jsonl'}"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:")


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["lora", "packing"])
def test_lora_merges_and_packing_trains(tiny_model_path, tmp_path, variant):
    """LoRA (small-model recipes) ends in a plain merged checkpoint; padding-free packing trains."""
    import torch
    from safetensors.torch import load_file

    from sandlab.train.sft import run_sft

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": PROMPT, "completion": [{"role": "assistant", "content": f"<think>{i}</think>\\boxed{{{i}}}"}]}) + "\n"
                            for i in range(6)))
    trl = {**CPU_TRL, "max_steps": 2, "max_length": 256}
    extra = {"lora_r": 8, "lora_alpha": 16, "trl": {**trl, "learning_rate": 1e-2}} if variant == "lora" else {"packing": True, "trl": {**trl, "packing_strategy": "bfd"}}
    cfg = TrainConfig(per_device_train_batch_size=2, num_processes=1, global_batch_size=2, attn_implementation="sdpa", **extra)
    out = tmp_path / "out"
    run_sft(str(tiny_model_path), str(data), cfg, output_dir=str(out), run_name="t", seed=0, report_to=[])
    assert not (out / "adapter_config.json").exists()  # merged: vLLM and eval load it as is
    base, tuned = load_file(str(Path(tiny_model_path) / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert base.keys() == tuned.keys()
    assert any(not torch.equal(base[k], tuned[k]) for k in base)


def test_pre_launch_validation_fails_fast_with_one_line(tiny_model_path, tmp_path):
    from sandlab.train.validate import validate_training

    ok = TrainConfig(num_processes=1, global_batch_size=2, attn_implementation="sdpa", trl={"max_length": 256, "bf16": False, "use_cpu": True})
    acc = ROOT / "accelerate_configs/ddp.yaml"
    checked = validate_training(str(tiny_model_path), ok, accelerate_config=acc)
    assert checked["turn_end"] == "<|im_end|>" and checked["max_position_embeddings"] >= 256
    import importlib.util

    import torch

    bad = [
        ({"trl": {**ok.trl, "max_length": 10**6}}, "^train.trl.max_length=1000000 exceeds the model's max_position_embeddings"),
        ({"num_processes": 2, "global_batch_size": 4, "accelerate_config": "accelerate_configs/missing.yaml"}, "does not exist"),
        ({"trl": {**ok.trl, "learning_rte": 1e-5}}, r"^train.trl.learning_rte is not an SFTConfig field; did you mean learning_rate\?$"),
        ({"trl": {**ok.trl, "warmup_ratio": 0.1}}, "did you mean warmup_steps"),
        ({"trl": {**ok.trl, "max_steps": "ten"}}, r"^train.trl.max_steps='ten' does not fit trl.SFTConfig.max_steps \(int\)$"),
    ]
    if importlib.util.find_spec("flash_attn") is None:  # the CPU machines this suite runs on
        bad.append(({"attn_implementation": "flash_attention_2"}, "needs flash-attn"))
    if not torch.cuda.is_available():
        bad.append(({"trl": {**ok.trl, "use_cpu": False}}, "no GPU is visible"))
        bad.append(({"trl": {"max_length": 256, "bf16": False}}, "no GPU is visible"))  # TRL's default: use_cpu=False
    for change, message in bad:
        cfg = TrainConfig(**{**vars(ok), **change})
        with pytest.raises(ConfigError, match=message):
            validate_training(str(tiny_model_path), cfg, accelerate_config=ROOT / cfg.accelerate_config)
    with pytest.raises(ConfigError, match=r"unknown dataset format \(fields seen: \['messages'\]\); known formats: .*prompt_completion"):
        (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": []}) + "\n")
        validate_training(str(tiny_model_path), ok, accelerate_config=acc, dataset_path=str(tmp_path / "bad.jsonl"))


DATASETS = ROOT / "tests/fixtures/datasets"


@needs_fixture
@pytest.mark.parametrize("name", ["sand_post_training.jsonl", "am_distilled.jsonl.zst", "openthoughts.json"])
def test_r1_template_keeps_the_trace_of_every_reader_format(r1_model, name):
    """Traces of any dataset format (SAND's missing <think>, AM's <answer>, OpenThoughts' markers) survive the
    R1 template that strips <think> text, rewritten into train.reasoning_format."""
    from transformers import AutoTokenizer

    from sandlab.readers import read_records
    from sandlab.train.sft import load_sft_dataset

    tok = AutoTokenizer.from_pretrained(r1_model)
    fmt = ChatFormat.from_tokenizer(tok)
    for reasoning_format in ("think", "think_answer"):
        records = read_records(str(DATASETS / name), reasoning_format=reasoning_format).records
        for record, ex in zip(records, load_sft_dataset(str(DATASETS / name), reasoning_format=reasoning_format)):
            sample = fmt.tokenize(ex["prompt"], ex["completion"])
            trained = tok.decode([i for i, m in zip(sample["input_ids"], sample["completion_mask"]) if m])
            assert trained == record["completion"][0]["content"] + "<｜end▁of▁sentence｜>"
            assert record["trace"] in trained and trained.startswith("<think>\n")
            assert ("<answer>" in trained) == (reasoning_format == "think_answer")


def test_inspection_shows_any_format_as_it_trains(tiny_model_path):
    import io

    from rich.console import Console

    from sandlab.train.inspect import inspect_dataset

    cfg = TrainConfig(num_processes=1, global_batch_size=2, attn_implementation="sdpa", trl={"max_length": 256})
    out = io.StringIO()
    stats = inspect_dataset(str(tiny_model_path), str(DATASETS / "sand_post_training.jsonl"), cfg, samples=1,
                            console=Console(file=out, width=200, color_system=None))
    text = out.getvalue()
    assert stats["samples"] == 3 and stats["turn_end_token"] == "<|im_end|>"
    assert "<think>\nI need to add 17 and 25. 17 + 25 = 42.\n</think>\n\nThe sum is \\boxed{42}.<|im_end|>" in text
    assert "green = trained on" in text
