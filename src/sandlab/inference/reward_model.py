"""Reward models: a Hugging Face sequence-classification model with one output (e.g. the
Skywork-Reward-V2 family) scores (conversation, response) pairs; the logit is the reward.

Two engines: transformers (``AutoModelForSequenceClassification``, length-sorted batches, any device)
and vLLM's pooling runner (``LLM(runner="pooling").classify``), where vLLM supports the architecture.
Both see the same token ids: the reward model's chat template renders the pair, and a pair longer than
``max_length`` loses the front of the response (its end, where the answer is, stays), counted.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandlab.config import RewardModelEngine, RewardModelSettings
from sandlab.errors import BackendUnavailableError, ConfigError
from sandlab.inference.base import Conversation, one_line
from sandlab.models import resolve_model_path

log = logging.getLogger(__name__)

_MARK = "\x1eSANDLAB-RESPONSE\x1e"  # stands for the response while the chat template renders the pair


@dataclass
class RewardScores:
    scores: list[float]
    truncated: list[bool]  # per pair: it lost the front of its response (or of the prompt) to fit max_length


def _read_config(path: str, what: str) -> dict[str, Any]:
    local = Path(path) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    from transformers import AutoConfig  # noqa: PLC0415 (a Hub id: its cached config)

    try:
        return AutoConfig.from_pretrained(path).to_dict()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what}={path!r}: cannot read its config ({one_line(exc)})") from None


def check_reward_model(spec: str, what: str = "data.score.reward_model.model") -> str:
    """The model's path, after checking from its config alone (nothing loads) that it is a
    sequence-classification model with a single output; else one line saying so."""
    path = resolve_model_path(spec, what=what)
    config = _read_config(path, what)
    architectures = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ConfigError(f"{what}={spec!r} has no sequence-classification head (architectures: {architectures}); "
                          "give a reward model, e.g. Skywork/Skywork-Reward-V2-Llama-3.1-8B")
    labels = len(config.get("id2label") or {}) or config.get("num_labels") or 2
    if labels != 1:
        raise ConfigError(f"{what}={spec!r} has {labels} outputs; a reward model has one (a scalar reward)")
    return path


def encode_pair(tokenizer: Any, conversation: Conversation, response: str, max_length: int) -> tuple[list[int], bool]:
    """Token ids of ``conversation`` + the assistant ``response`` in the model's chat template, at most
    ``max_length``, and whether they were cut. A long pair keeps the whole prompt and the end of the
    response; when the prompt alone does not fit, the last ``max_length`` tokens of the whole pair."""
    full = tokenizer.apply_chat_template([*conversation, {"role": "assistant", "content": response}], tokenize=False)
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_length:
        return ids, False
    marked = tokenizer.apply_chat_template([*conversation, {"role": "assistant", "content": _MARK}], tokenize=False)
    if marked.count(_MARK) == 1:
        before, after = marked.split(_MARK)
        head = tokenizer(before, add_special_tokens=False)["input_ids"]
        tail = tokenizer(after, add_special_tokens=False)["input_ids"]
        room = max_length - len(head) - len(tail)
        if room > 0:
            body = tokenizer(response, add_special_tokens=False)["input_ids"]
            return head + body[len(body) - room:] + tail, True
    return ids[-max_length:], True


class RewardModel:
    """Scores (conversation, response) pairs with a sequence-classification reward model."""

    def __init__(self, settings: RewardModelSettings, *, what: str = "data.score.reward_model.model") -> None:
        from transformers import AutoTokenizer  # noqa: PLC0415

        self.settings = settings
        self.path = check_reward_model(settings.model, what)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        if self.tokenizer.chat_template is None:
            raise ConfigError(f"{what}={settings.model!r} has no chat template to render (prompt, response) pairs with")
        self._llm: Any = None
        self._engine: Any = None
        self._model: Any = None
        if settings.engine == RewardModelEngine.vllm:
            self._start_vllm()
        else:
            self._load_transformers(what)

    def _load_transformers(self, what: str) -> None:
        import torch  # noqa: PLC0415
        from transformers import AutoModelForSequenceClassification  # noqa: PLC0415

        s = self.settings
        self.device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = getattr(torch, s.dtype, None) if s.dtype != "auto" else "auto"
        if dtype is None:
            raise ConfigError(f"data.score.reward_model.dtype={s.dtype!r} is not a torch dtype")
        if self.device == "cpu" and dtype in (torch.float16,):
            dtype = torch.float32  # half precision matmuls are slow or missing on CPU
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(self.path, dtype=dtype, output_loading_info=True)
        except (OSError, ValueError) as exc:
            raise BackendUnavailableError(f"transformers could not load the reward model {s.model!r} ({one_line(exc)})") from None
        # A head initialised from scratch would score at random: the checkpoint must hold it.
        fresh = [k for k in info.get("missing_keys", ()) if k.split(".")[0] in ("score", "classifier", "v_head")]
        if fresh:
            raise ConfigError(f"{what}={s.model!r}: the checkpoint has no weights for its classification head ({fresh[0]}); give a trained reward model")
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.pad_id = model.config.pad_token_id
        self._model = model.to(self.device).eval()

    def _start_vllm(self) -> None:
        # sandlab's engine wrapper, for what it does around vllm.LLM: CPU dtype and thread settings,
        # the memory check, and undoing vLLM's process-wide changes on close.
        from sandlab.inference.vllm_engine import VLLMEngineBackend  # noqa: PLC0415

        s = self.settings
        kwargs = {"max_model_len": s.max_length, "dtype": s.dtype, "runner": "pooling", **s.extra_engine_args}
        try:
            self._engine = VLLMEngineBackend(self.path, **kwargs)
        except BackendUnavailableError as exc:
            raise BackendUnavailableError(f"{str(exc).splitlines()[0]}; as a pooling (reward) model: try data.score.reward_model.engine=transformers") from None
        self._llm = self._engine.llm

    def __repr__(self) -> str:
        return f"RewardModel({self.settings.model!r}, engine={self.settings.engine})"

    def score(self, pairs: list[tuple[Conversation, str]], *, desc: str = "reward model") -> RewardScores:
        encoded = [encode_pair(self.tokenizer, conv, response, self.settings.max_length) for conv, response in pairs]
        ids = [e[0] for e in encoded]
        truncated = [e[1] for e in encoded]
        scores = self._score_vllm(ids) if self._llm is not None else self._score_transformers(ids, desc)
        return RewardScores(scores=scores, truncated=truncated)

    def _score_transformers(self, ids: list[list[int]], desc: str) -> list[float]:
        import torch  # noqa: PLC0415
        from tqdm.auto import tqdm  # noqa: PLC0415

        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch: little padding
        scores = [0.0] * len(ids)
        size = max(1, self.settings.batch_size)
        for start in tqdm(range(0, len(order), size), desc=desc, unit="batch", dynamic_ncols=True, disable=len(order) <= size):
            batch = order[start:start + size]
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            with torch.inference_mode():
                # No KV cache: one forward per batch, and the cache would hold every layer's keys and values at once.
                logits = self._model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False).logits
            for row, i in enumerate(batch):
                scores[i] = float(logits[row, 0].float())
        return scores

    def _score_vllm(self, ids: list[list[int]]) -> list[float]:
        from vllm import PoolingParams  # noqa: PLC0415

        outputs = self._llm.classify([{"prompt_token_ids": x} for x in ids], pooling_params=PoolingParams(use_activation=False), use_tqdm=len(ids) > 1)
        return [float(out.outputs.probs[0]) for out in outputs]

    def close(self) -> None:
        self._model = None
        if self._engine is not None:
            self._engine.close()
            self._engine = self._llm = None
