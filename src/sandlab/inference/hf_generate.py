"""Fallback backend on ``transformers`` ``generate`` (no vLLM needed; slow, but runs anywhere)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sandlab.config import BackendConfig, SamplingSettings
from sandlab.errors import BackendUnavailableError
from sandlab.inference.base import ChatBackend, Completion, Conversation, Row, check_model_files, is_prefilled, isolate, one_line

log = logging.getLogger(__name__)


class TransformersBackend(ChatBackend):
    """Batched chat generation with ``model.generate`` (left padding, stop strings, n samples)."""

    name = "hf"

    def __init__(self, model: str, *, dtype: str = BackendConfig.dtype, device: str | None = None, batch_size: int = 8,
                 chat_template: str | None = None, chat_template_kwargs: dict[str, Any] | None = None) -> None:
        import torch  # noqa: PLC0415
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

        check_model_files(model, chat_template, "transformers")
        template_text = Path(chat_template).expanduser().read_text() if chat_template is not None else None
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
            raise BackendUnavailableError(f"transformers could not load {model!r} ({one_line(exc)})") from exc
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
        self._warned_schema = False
        self.chat_template_kwargs = dict(chat_template_kwargs or {})

    def __repr__(self) -> str:
        return f"TransformersBackend(model={self.model_name!r}, device={self.device!r}, batch_size={self.batch_size})"

    def _render(self, conversation: Conversation) -> str:
        prefill = is_prefilled(conversation)
        return self.tokenizer.apply_chat_template(
            conversation,
            tokenize=False,
            add_generation_prompt=not prefill,
            continue_final_message=prefill,
            **self.chat_template_kwargs,
        )

    def _finish(self, tokens: list[int], sampling: SamplingSettings) -> tuple[str, int, str]:
        """Text, completion token count and finish reason of one generated row (prompt removed)."""
        end = next((i for i, t in enumerate(tokens) if t in self.eos_ids or t == self.pad_id), len(tokens))
        text = self.tokenizer.decode(tokens[:end], skip_special_tokens=True)
        cuts = [text.find(s) for s in sampling.stop if s and s in text]
        if cuts:
            return text[: min(cuts)], end, "stop"
        if end < len(tokens):
            return text, end + 1 if tokens[end] in self.eos_ids else end, "stop"
        return text, end, "length" if end >= sampling.max_tokens else "stop"

    def _generate_batch(self, texts: list[str], sampling: SamplingSettings) -> list[Row]:
        import torch  # noqa: PLC0415

        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        if sampling.json_schema is not None and not self._warned_schema:
            self._warned_schema = True  # the caller validates what comes back; this backend cannot constrain it
            log.warning("the hf backend cannot enforce a JSON schema (structured output); use the vllm or openai backend to enforce it")
        do_sample = sampling.temperature > 0
        kwargs: dict[str, Any] = dict(
            max_new_tokens=sampling.max_tokens,
            do_sample=do_sample,
            num_return_sequences=sampling.n,
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
        results: list[Row] = []
        for i, prompt_tokens in enumerate(prompt_counts):
            completions = []
            for row in rows[i * sampling.n : (i + 1) * sampling.n]:
                text, count, reason = self._finish(row, sampling)
                completions.append(Completion(text, int(prompt_tokens), count, reason))
            results.append(completions)
        return results

    def _generate(self, conversations: list[Conversation], sampling: SamplingSettings, *, desc: str,
                  seeds: list[int | None]) -> list[Row]:
        import torch  # noqa: PLC0415
        from tqdm.auto import tqdm  # noqa: PLC0415

        # transformers samples a whole batch from one generator: the call's first seed seeds it, so
        # samples depend on what is batched together (unlike vLLM's and servers' per-request seeds).
        if seeds and seeds[0] is not None:
            torch.manual_seed(seeds[0])
        results: list[Row] = [[] for _ in conversations]
        rendered: dict[int, str] = {}
        for i, conv in enumerate(conversations):
            try:
                rendered[i] = self._render(conv)
            except Exception as exc:  # noqa: BLE001 (one bad conversation must not fail the batch)
                results[i] = exc
        order = sorted(rendered, key=lambda i: len(rendered[i]))  # similar lengths together: less padding
        with tqdm(total=len(conversations), desc=desc, unit="conv", dynamic_ncols=True) as bar:
            bar.update(len(conversations) - len(order))
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                outs = isolate([rendered[i] for i in batch], lambda texts: self._generate_batch(texts, sampling), "transformers generate")
                for i, out in zip(batch, outs):
                    results[i] = out
                bar.update(len(batch))
        return results

    def close(self) -> None:
        import gc  # noqa: PLC0415

        super().close()
        self.model = None
        gc.collect()
        try:
            import torch  # noqa: PLC0415

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass
