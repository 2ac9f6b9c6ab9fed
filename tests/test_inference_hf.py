"""The transformers ``generate`` fallback backend with the tiny random model."""

from __future__ import annotations

import pytest

from sandlab.errors import BackendUnavailableError
from sandlab.inference.base import SamplingConfig

pytestmark = pytest.mark.timeout(300)

CONVS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime number, please."}],
    [{"role": "user", "content": "Hi"}],
]
PREFILLED = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "The answer is"}]


@pytest.fixture(scope="module")
def hf(tiny_model_path):
    from sandlab.inference.hf_generate import TransformersBackend

    backend = TransformersBackend(str(tiny_model_path), dtype="float32", device="cpu", batch_size=2)
    yield backend
    backend.close()


def _prompt_len(tokenizer, conv, *, prefill=False) -> int:
    ids = tokenizer.apply_chat_template(
        conv, tokenize=True, add_generation_prompt=not prefill, continue_final_message=prefill, return_dict=False
    )
    return len(ids)


def test_n_samples_lengths_and_token_counts(hf):
    out = hf.generate(CONVS, SamplingConfig(n=2, temperature=1.0, max_tokens=10, seed=0))
    assert [len(row) for row in out] == [2, 2, 2]
    for conv, row in zip(CONVS, out):
        for c in row:
            assert c.ok
            assert c.prompt_tokens == _prompt_len(hf.tokenizer, conv)  # left padding not counted
            assert c.finish_reason == "length" and c.completion_tokens == 10
            assert len(hf.tokenizer(c.text, add_special_tokens=False)["input_ids"]) <= 12
        assert row[0].text != row[1].text


def test_seed_reproducible_and_seeds_differ(hf):
    sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=8, seed=11)
    a = hf.generate(CONVS[:2], sampling)
    b = hf.generate(CONVS[:2], sampling)
    c = hf.generate(CONVS[:2], SamplingConfig(n=2, temperature=1.0, max_tokens=8, seed=12))
    texts = lambda out: [[x.text for x in row] for row in out]  # noqa: E731
    assert texts(a) == texts(b)
    assert texts(a) != texts(c)


def test_greedy_repeats_for_n(hf):
    out = hf.generate(CONVS[:1], SamplingConfig(n=3, temperature=0.0, max_tokens=6))
    assert len({c.text for c in out[0]}) == 1 and len(out[0]) == 3


def test_stop_strings(hf):
    sampling = SamplingConfig(n=1, temperature=1.0, max_tokens=24, seed=3)
    full = hf.generate(CONVS[:1], sampling)[0][0].text
    words = full.split()
    assert len(words) >= 4, full
    stop = words[2]
    sampling.stop = [stop]
    cut = hf.generate(CONVS[:1], sampling)[0][0]
    assert cut.finish_reason == "stop"
    assert stop not in cut.text
    assert cut.text == full[: full.index(stop)]
    assert 0 < cut.completion_tokens < 24


def test_prefill_and_mixed_batch(hf):
    out = hf.generate([CONVS[0], PREFILLED], SamplingConfig(n=1, temperature=0.0, max_tokens=4))
    assert out[0][0].prompt_tokens == _prompt_len(hf.tokenizer, CONVS[0])
    assert out[1][0].prompt_tokens == _prompt_len(hf.tokenizer, PREFILLED, prefill=True)


def test_custom_chat_template(tiny_model_path, tmp_path):
    from sandlab.inference.hf_generate import TransformersBackend

    template = tmp_path / "plain.jinja"
    template.write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    backend = TransformersBackend(str(tiny_model_path), dtype="float32", chat_template=str(template))
    out = backend.generate(CONVS[:1], SamplingConfig(max_tokens=2))
    expected = len(backend.tokenizer("user: What is 2 + 2?\nassistant:", add_special_tokens=False)["input_ids"])
    assert out[0][0].prompt_tokens == expected


def test_missing_model_is_one_clear_line(tmp_path):
    from sandlab.inference.hf_generate import TransformersBackend

    with pytest.raises(BackendUnavailableError) as info:
        TransformersBackend(str(tmp_path / "missing"))
    assert "\n" not in str(info.value) and "does not exist" in str(info.value)


# --- build_backend ------------------------------------------------------------------------------
def test_build_backend_from_dataclass_and_dictconfig(tiny_model_path):
    from omegaconf import OmegaConf

    from sandlab.config import BackendConfig
    from sandlab.inference import build_backend
    from sandlab.inference.hf_generate import TransformersBackend
    from sandlab.inference.openai_client import OpenAICompatibleBackend

    cfg = BackendConfig(backend="hf", model="embedded://tiny-random-llama", dtype="float32", extra_engine_args={"batch_size": 3})
    backend = build_backend(cfg)
    assert isinstance(backend, TransformersBackend) and backend.batch_size == 3
    assert backend.model_name == str(tiny_model_path)  # embedded:// resolved to the cached checkpoint
    assert backend.generate(CONVS[:1], SamplingConfig(max_tokens=2))[0][0].completion_tokens == 2

    dict_cfg = OmegaConf.structured(
        BackendConfig(backend="openai", model="served-name", base_urls=["http://127.0.0.1:9/v1"], max_retries=1)
    )
    client = build_backend(dict_cfg)
    assert isinstance(client, OpenAICompatibleBackend)
    assert client.model == "served-name" and client.base_urls == ["http://127.0.0.1:9/v1"] and client.max_retries == 1


def test_build_backend_config_errors(tmp_path):
    from sandlab.config import BackendConfig
    from sandlab.errors import ConfigError
    from sandlab.inference import build_backend

    with pytest.raises(ConfigError, match="not one of"):
        build_backend(BackendConfig(backend="tgi", model="x"))
    with pytest.raises(ConfigError, match="base_urls"):
        build_backend(BackendConfig(backend="openai", model="x"))
    with pytest.raises(ConfigError, match="teacher.model"):
        build_backend(BackendConfig(backend="hf", model=str(tmp_path / "missing")), what="teacher.model")
    with pytest.raises(ConfigError, match="not supported by the hf backend"):
        build_backend(BackendConfig(backend="hf", model="embedded://tiny-random-llama", extra_engine_args={"foo": 1}))
