"""The prompt cache: text embeddings as pipeline kwargs, encoded once per prompt (a slider move costs nothing)."""

from __future__ import annotations

from collections import OrderedDict

import torch


CACHE_SIZE = 64  # prompts kept (most recently used)


def encode_prompt(pipe, family: str, device: str, prompt: str, negative_prompt: str, guided: bool) -> dict:
    """The pipeline's own encode_prompt, as the kwargs its __call__ takes (prompt_embeds (1, 77, D), ...)."""
    negative = negative_prompt if guided else None
    with torch.inference_mode():
        if family == "sdxl":
            embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
                prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guided,
                negative_prompt=negative,
            )  # fmt: skip
            kwargs = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled)
            if guided:
                kwargs.update(negative_prompt_embeds=negative_embeds, negative_pooled_prompt_embeds=negative_pooled)
            return kwargs
        embeds, negative_embeds = pipe.encode_prompt(prompt, device, 1, guided, negative_prompt=negative)
        return dict(prompt_embeds=embeds, **({"negative_prompt_embeds": negative_embeds} if guided else {}))


def length_warnings(tokenizer, prompt: str) -> list[str]:
    """A warning when the prompt is longer than the text encoder reads."""
    tokens = len(tokenizer(prompt, truncation=False).input_ids)
    if tokens <= tokenizer.model_max_length:
        return []
    return [f"The prompt is {tokens} tokens long; the text encoder reads the first {tokenizer.model_max_length}"
            " (including start and end), so the rest is ignored."]  # fmt: skip


class PromptCache:
    """Embeddings by (prompt, negative prompt, guided), least recently used dropped past `size`."""

    def __init__(self, pipe, family: str, device: str, size: int = CACHE_SIZE):
        self.pipe, self.family, self.device, self.size = pipe, family, device, size
        self._entries: OrderedDict[tuple, tuple[dict, list[str]]] = OrderedDict()  # key -> (kwargs, warnings)

    def get(self, prompt: str, negative_prompt: str, guided: bool) -> tuple[dict, bool, list[str]]:
        """(kwargs, cached, warnings): neither the tokenizer nor the text encoder runs again for a cached prompt."""
        key = (prompt, negative_prompt if guided else "", guided)
        if key in self._entries:
            self._entries.move_to_end(key)
            kwargs, warnings = self._entries[key]
            return kwargs, True, warnings
        kwargs = encode_prompt(self.pipe, self.family, self.device, prompt, negative_prompt, guided)
        warnings = length_warnings(self.pipe.tokenizer, prompt)
        self._entries[key] = (kwargs, warnings)
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return kwargs, False, warnings

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
