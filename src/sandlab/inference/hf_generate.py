"""Fallback backend on ``transformers`` ``generate`` (no vLLM needed; slow, but runs anywhere)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from sandlab.errors import BackendUnavailableError
from sandlab.inference.base import ChatBackend, Completion, Conversation, SamplingConfig
from sandlab.models import looks_like_local_path

log = logging.getLogger(__name__)


def _is_prefilled(conversation: Conversation) -> bool:
    return bool(conversation) and conversation[-1].get("role") == "assistant"


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


class TransformersBackend(ChatBackend):
    """Batched chat generation with ``model.generate`` (left padding, stop strings, n samples)."""

    name = "hf"

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        device: str | None = None,
        batch_size: int = 8,
        chat_template: str | None = None,
    ) -> None:
        import torch  # noqa: PLC0415
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

        path = Path(model).expanduser()
        looks_local = looks_like_local_path(model)
        if looks_local and not path.exists():
            raise BackendUnavailableError(
                f"model path {model!r} does not exist; point the backend's model at a checkpoint directory or a Hub id"
            )
        template_text = None
        if chat_template is not None:
            template_path = Path(chat_template).expanduser()
            if not template_path.is_file():
                raise BackendUnavailableError(
                    f"chat_template {chat_template!r} is not a file; give the path of a .jinja chat template or leave it unset"
                )
            template_text = template_path.read_text()
        self.model_name = model
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = max(1, int(batch_size))
        if dtype in (None, "auto"):
            torch_dtype: Any = "auto"
        else:
            torch_dtype = getattr(torch, str(dtype), None)
            if not isinstance(torch_dtype, torch.dtype):
                raise BackendUnavailableError(f"dtype {dtype!r} is not a torch dtype; use auto, float32, bfloat16 or float16")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model)
            self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).to(self.device)
        except (OSError, ValueError) as exc:
            raise BackendUnavailableError(f"transformers could not load {model!r} ({_one_line(exc)})") from exc
        self.model.eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if template_text is not None:
            self.tokenizer.chat_template = template_text
        if self.tokenizer.chat_template is None:
            raise BackendUnavailableError(f"{model!r} has no chat template; pass chat_template=<path to a .jinja file>")
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = self.tokenizer.pad_token_id

    def __repr__(self) -> str:
        return f"TransformersBackend(model={self.model_name!r}, device={self.device!r}, batch_size={self.batch_size})"

    def _render(self, conversation: Conversation) -> str:
        prefill = _is_prefilled(conversation)
        return self.tokenizer.apply_chat_template(
            conversation,
            tokenize=False,
            add_generation_prompt=not prefill,
            continue_final_message=prefill,
        )

    def _finish(self, tokens: list[int], sampling: SamplingConfig) -> tuple[str, int, str]:
        """Text, completion token count and finish reason of one generated row (prompt removed)."""
        end = next((i for i, t in enumerate(tokens) if t in self.eos_ids or t == self.pad_id), len(tokens))
        text = self.tokenizer.decode(tokens[:end], skip_special_tokens=True)
        cuts = [text.find(s) for s in sampling.stop if s and s in text]
        if cuts:
            return text[: min(cuts)], end, "stop"
        if end < len(tokens):
            return text, end + 1 if tokens[end] in self.eos_ids else end, "stop"
        return text, end, "length" if end >= sampling.max_tokens else "stop"

    def _generate_batch(self, texts: list[str], sampling: SamplingConfig, samples: int) -> list[list[Completion]]:
        import torch  # noqa: PLC0415

        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        do_sample = sampling.temperature > 0
        kwargs: dict[str, Any] = dict(
            max_new_tokens=sampling.max_tokens,
            do_sample=do_sample,
            num_return_sequences=samples,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids),
        )
        if do_sample:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        with torch.inference_mode():
            out = self.model.generate(**enc, **kwargs)
        prompt_len = enc["input_ids"].shape[1]
        prompt_counts = enc["attention_mask"].sum(dim=1).tolist()
        rows = out[:, prompt_len:].tolist()
        results = []
        for i, prompt_tokens in enumerate(prompt_counts):
            completions = []
            for row in rows[i * samples : (i + 1) * samples]:
                text, count, reason = self._finish(row, sampling)
                completions.append(Completion(text, int(prompt_tokens), count, reason))
            results.append(completions)
        return results

    def _generate_safe(self, texts: list[str], sampling: SamplingConfig, samples: int) -> list[list[Completion]]:
        """One batch; if it fails (e.g. out of memory), retry its items one by one."""
        try:
            return self._generate_batch(texts, sampling, samples)
        except Exception as exc:  # noqa: BLE001 (one bad item must not fail the run)
            log.warning("transformers generate failed for a batch of %d: %s", len(texts), _one_line(exc))
            if len(texts) == 1:
                return [[Completion("", finish_reason="error", error=_one_line(exc)) for _ in range(samples)]]
        return [self._generate_safe([text], sampling, samples)[0] for text in texts]

    def generate(
        self,
        conversations: Sequence[Conversation],
        sampling: SamplingConfig,
        *,
        desc: str = "generate",
    ) -> list[list[Completion]]:
        import torch  # noqa: PLC0415
        from tqdm.auto import tqdm  # noqa: PLC0415

        convs = [list(c) for c in conversations]
        if not convs:
            return []
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        greedy_repeat = sampling.temperature == 0 and sampling.n > 1  # greedy: one sample, repeated
        samples = 1 if greedy_repeat else sampling.n
        results: list[list[Completion] | None] = [None] * len(convs)
        rendered: dict[int, str] = {}
        for i, conv in enumerate(convs):
            try:
                rendered[i] = self._render(conv)
            except Exception as exc:  # noqa: BLE001 (one bad conversation must not fail the batch)
                results[i] = [Completion("", finish_reason="error", error=_one_line(exc)) for _ in range(samples)]
        # Similar lengths together: less padding.
        order = sorted(rendered, key=lambda i: len(rendered[i]))
        with tqdm(total=len(convs), desc=desc, unit="conv", dynamic_ncols=True) as bar:
            bar.update(len(convs) - len(order))
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                outs = self._generate_safe([rendered[i] for i in batch], sampling, samples)
                for i, out in zip(batch, outs):
                    results[i] = out
                bar.update(len(batch))
        final = [r or [] for r in results]
        if greedy_repeat:
            final = [[replace(r[0]) for _ in range(sampling.n)] for r in final]
        return final

    def close(self) -> None:
        import gc  # noqa: PLC0415

        self.model = None
        gc.collect()
        try:
            import torch  # noqa: PLC0415

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass
