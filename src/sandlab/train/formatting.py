"""How a prompt/completion conversation becomes training text, for any chat template.

Chat templates are written for inference, and some rewrite past assistant turns: the original
DeepSeek-R1-Distill-Qwen template keeps only the text after the last ``</think>``, so rendering a
whole training conversation with it silently drops the reasoning trace. sandlab therefore renders
only the *prompt* with the template (with the generation prompt, exactly as at inference) and
appends the assistant content verbatim, closed by the token that ends an assistant turn in that
template (``<|im_end|>`` for ChatML, ``<｜end▁of▁sentence｜>`` for R1). TRL then trains on the
completion tokens only, and that closing token becomes the tokenizer's and generation config's eos.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sandlab.errors import ConfigError

PROBE_TRACE = "sandlab-probe-reasoning-trace"
PROBE_ANSWER = "sandlab-probe-final-answer"


@dataclass
class ChatFormat:
    tokenizer: Any
    turn_end: str  # the token that closes an assistant turn: eos for training and generation
    template_keeps_trace: bool  # False for templates that strip <think> text from assistant turns
    strip_bos: str = ""  # the template writes the BOS the tokenizer also adds: drop the template's

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ChatFormat:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("the tokenizer has no chat template; set model.chat_template to a .jinja file")
        content = f"<think>\n{PROBE_TRACE}\n</think>\n\n{PROBE_ANSWER}"
        try:
            full = tokenizer.apply_chat_template(
                [{"role": "user", "content": "Q"}, {"role": "assistant", "content": content}], tokenize=False
            )
            tokenizer.apply_chat_template([{"role": "user", "content": "Q"}], tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 (jinja errors of user templates: one line)
            raise ConfigError(f"the chat template does not render a user/assistant conversation ({type(exc).__name__}: {exc})") from None
        if PROBE_ANSWER not in full:
            raise ConfigError("the chat template does not render assistant messages; set model.chat_template")
        suffix = full.split(PROBE_ANSWER, 1)[1].lstrip(" ")
        specials = sorted({*tokenizer.get_added_vocab(), *tokenizer.all_special_tokens}, key=len, reverse=True)
        turn_end = next((t for t in specials if t and suffix.startswith(t)), None)
        if turn_end is None:
            raise ConfigError(f"cannot tell which special token ends an assistant turn in the chat template (it renders {suffix[:40]!r} after one)")
        bos = tokenizer.bos_token or ""
        adds_bos = bool(bos) and tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]
        return cls(tokenizer, turn_end, template_keeps_trace=PROBE_TRACE in full, strip_bos=bos if adds_bos else "")

    def render(self, prompt: list[dict[str, str]], completion: list[dict[str, str]]) -> dict[str, str]:
        """Plain-text prompt (template + generation prompt) and completion (content + turn end)."""
        if not completion or any(m.get("role") != "assistant" for m in completion):
            raise ConfigError("each completion must be a list of assistant messages")
        text = self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        if self.strip_bos and text.startswith(self.strip_bos):  # the tokenizer adds it when tokenizing
            text = text[len(self.strip_bos) :]
        content = "".join(m["content"] for m in completion)
        return {"prompt": text, "completion": content + self.turn_end}

    def tokenize(self, prompt: list[dict[str, str]], completion: list[dict[str, str]], max_length: int | None = None) -> dict[str, Any]:
        """Token ids and loss mask as TRL builds them from the rendered text (the completion starts where
        the tokenized prompt and prompt+completion diverge); ``truncated`` when longer than max_length."""
        rendered = self.render(prompt, completion)
        prompt_ids = self.tokenizer(text=rendered["prompt"]).input_ids
        ids = self.tokenizer(text=rendered["prompt"] + rendered["completion"]).input_ids
        start = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), min(len(prompt_ids), len(ids)))
        mask = [0] * start + [1] * (len(ids) - start)
        length = len(ids)
        if max_length is not None:
            ids, mask = ids[:max_length], mask[:max_length]
        return {"input_ids": ids, "completion_mask": mask, "prompt_tokens": start, "length": length,
                "truncated": max_length is not None and length > max_length, **rendered}
