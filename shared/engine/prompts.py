"""SDXL prompt encoding with both CLIP text encoders, without Ray and without a diffusers pipeline.

`PromptEncoder` turns (prompt, negative_prompt) pairs into the four conditioning tensors SDXL's
UNet takes, exactly as `StableDiffusionXLPipeline.encode_prompt` computes them: the penultimate
hidden states of both encoders concatenated along the feature axis, and encoder 2's projected
`text_embeds` as the pooled vector. A whole batch of pairs goes through each encoder in one
forward pass, because `ClipEncoder` calls `encode` from a `@serve.batch` method.

Prompts longer than the encoders' window (77 tokens including start/end) are refused with
`InvalidRequestError(code="prompt_too_long")` rather than truncated: diffusers truncates with
only a log warning, which silently drops the end of the user's prompt.

`embed` gives encoder 2's projected `text_embeds` alone: CLIP text embeddings in the space the
vision encoder's image embeddings share, for /v1/embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.api.jobs import PromptEmbeddings
from shared.errors import InvalidRequestError

# SDXL base's pipeline default; a model_index.json without the key means this value.
DEFAULT_FORCE_ZEROS_FOR_EMPTY_PROMPT = True


class PromptEncoder:
    """Both SDXL text encoders and their tokenizers, with the checks and batching around them.

    The modules are injected (built elsewhere, e.g. from object-store weights) and must already
    live on `device`; inputs are sent there. They may be fp16: results are always float32 numpy.
    """

    def __init__(
        self,
        tokenizer: Any,
        tokenizer_2: Any,
        text_encoder: torch.nn.Module,
        text_encoder_2: torch.nn.Module,
        device: str | torch.device = "cpu",
        force_zeros_for_empty_prompt: bool = DEFAULT_FORCE_ZEROS_FOR_EMPTY_PROMPT,
    ) -> None:
        self.tokenizers = (tokenizer, tokenizer_2)
        # eval() so that a module built in training mode (the default for a fresh nn.Module)
        # cannot apply dropout; it is a no-op for modules from from_pretrained.
        self.text_encoders = (text_encoder.eval(), text_encoder_2.eval())
        self.device = torch.device(device)
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.max_tokens: int = min(int(t.model_max_length) for t in self.tokenizers)

    @classmethod
    def from_pretrained_dir(
        cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> PromptEncoder:
        """Load both tokenizers and encoders from an SDXL folder in diffusers layout."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        root = Path(path)
        index = json.loads((root / "model_index.json").read_text())
        load_kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
        # Typed as plain modules: transformers' decorated PreTrainedModel.to confuses mypy.
        text_encoder: torch.nn.Module = CLIPTextModel.from_pretrained(
            root / "text_encoder", **load_kwargs
        )
        text_encoder_2: torch.nn.Module = CLIPTextModelWithProjection.from_pretrained(
            root / "text_encoder_2", **load_kwargs
        )
        return cls(
            tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
            tokenizer_2=CLIPTokenizer.from_pretrained(root / "tokenizer_2"),
            text_encoder=text_encoder.to(device),
            text_encoder_2=text_encoder_2.to(device),
            device=device,
            force_zeros_for_empty_prompt=bool(
                index.get("force_zeros_for_empty_prompt", DEFAULT_FORCE_ZEROS_FOR_EMPTY_PROMPT)
            ),
        )

    def encode(
        self, pairs: list[tuple[str, str | None]], force_zeros: bool | None = None
    ) -> list[PromptEmbeddings | InvalidRequestError]:
        """Encode (prompt, negative_prompt) pairs; one result per pair, in order.

        A pair whose prompt or negative is too long gets its `InvalidRequestError` (param
        `prompt` or `negative_prompt`) *returned* in its slot instead of raised, so one bad
        request in a `@serve.batch` batch does not fail the others; the caller raises it for
        that request. The valid pairs are encoded in one forward pass per encoder.

        A negative that is None or "" is all zeros when `force_zeros_for_empty_prompt` (SDXL
        base), otherwise the encoding of "". Note diffusers zeroes only None and encodes "" as
        text; we treat "" like an omitted negative so both spellings give the same image.
        `force_zeros` overrides the rule for this call: a refiner's checkpoint has its own.
        """
        errors = self._length_errors(pairs)
        valid = [i for i, error in enumerate(errors) if error is None]
        negatives = {i: self._negative_text(pairs[i][1], force_zeros) for i in valid}
        # Identical texts (a shared negative, a repeated prompt) are encoded once: with every
        # sequence padded to the full window and no attention mask, a row's output does not
        # depend on what else is in the batch.
        texts = [pairs[i][0] for i in valid] + [n for n in negatives.values() if n is not None]
        unique = list(dict.fromkeys(texts))
        encoded: dict[int, PromptEmbeddings] = {}
        if unique:
            hidden, pooled = self._forward(unique)
            row = {text: j for j, text in enumerate(unique)}
            for i in valid:
                negative = negatives[i]
                negative_row = None if negative is None else row[negative]
                encoded[i] = self._pair(hidden, pooled, row[pairs[i][0]], negative_row)
        return [encoded[i] if error is None else error for i, error in enumerate(errors)]

    def embed(
        self, texts: list[str], param: str = "input"
    ) -> list[np.ndarray | InvalidRequestError]:
        """text_encoder_2's projected pooled embedding (`text_embeds`, float32, 1-D, as
        diffusers computes the pooled prompt embedding) of each text, in one forward pass.

        Tokenized and length-checked like prompts: an over-long text gets its
        `InvalidRequestError` (param `param`) returned in its slot, as `encode` does.
        """
        unique = list(dict.fromkeys(texts))
        counts = dict(zip(unique, (max(c) for c in self._token_counts(unique)), strict=True))
        valid = [text for text in unique if counts[text] <= self.max_tokens]
        rows: dict[str, np.ndarray] = {}
        if valid:
            with torch.inference_mode():
                pooled = self._run(1, valid).text_embeds.float().cpu().numpy()
            rows = {text: pooled[i].copy() for i, text in enumerate(valid)}
        results: list[np.ndarray | InvalidRequestError] = []
        for text in texts:
            try:
                self._raise_if_too_long(counts[text], param)
            except InvalidRequestError as error:
                results.append(error)
            else:
                results.append(rows[text])
        return results

    def token_count(self, texts: list[str]) -> int:
        """Tokens of `texts` as text_encoder_2's tokenizer reads them (start/end included): the
        `usage` an embeddings answer reports."""
        return sum(count for _, count in self._token_counts(texts))

    def _length_errors(
        self, pairs: list[tuple[str, str | None]]
    ) -> list[InvalidRequestError | None]:
        """Per pair, the error for its first over-long text (prompt before negative), or None."""
        texts = list(dict.fromkeys(t for pair in pairs for t in pair if t is not None))
        counts = dict(zip(texts, (max(c) for c in self._token_counts(texts)), strict=True))
        errors: list[InvalidRequestError | None] = []
        for prompt, negative in pairs:
            try:
                self._raise_if_too_long(counts[prompt], "prompt")
                if negative is not None:
                    self._raise_if_too_long(counts[negative], "negative_prompt")
            except InvalidRequestError as error:
                errors.append(error)
            else:
                errors.append(None)
        return errors

    def _negative_text(self, negative: str | None, force_zeros: bool | None) -> str | None:
        """The text to encode for a negative, or None when it is all zeros instead."""
        zeros = self.force_zeros_for_empty_prompt if force_zeros is None else force_zeros
        if not negative and zeros:
            return None
        return negative or ""

    def _token_counts(self, texts: list[str]) -> list[tuple[int, int]]:
        if not texts:
            return []
        # verbose=False: tokenizing an over-long prompt just to measure it should not log
        # transformers' "sequence length is longer than the specified maximum" warning.
        ids = [tok(texts, verbose=False).input_ids for tok in self.tokenizers]
        return [(len(a), len(b)) for a, b in zip(*ids, strict=True)]

    def _raise_if_too_long(self, count: int, param: str) -> None:
        if count > self.max_tokens:
            raise InvalidRequestError(
                f"{param} is {count} tokens long; this model's text encoders take at most "
                f"{self.max_tokens} (including start/end tokens). Shorten the prompt.",
                code="prompt_too_long",
                param=param,
            )

    @torch.inference_mode()
    def _forward(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Run both encoders once over `texts`: (concatenated penultimate states, pooled)."""
        # Keep only encoder 1's penultimate layer so its other hidden states are freed before
        # encoder 2 runs.
        penultimate_1 = self._run(0, texts).hidden_states[-2]
        outputs_2 = self._run(1, texts)
        hidden = torch.cat([penultimate_1, outputs_2.hidden_states[-2]], dim=-1)
        # Only encoder 2 (CLIPTextModelWithProjection) gives the pooled vector SDXL uses.
        pooled = outputs_2.text_embeds
        return hidden.float().cpu().numpy(), pooled.float().cpu().numpy()

    def _run(self, which: int, texts: list[str]) -> Any:
        tokenizer, encoder = self.tokenizers[which], self.text_encoders[which]
        # Pad to the full window like diffusers: SDXL was trained on 77-token sequences padded
        # without an attention mask, so the pad tokens are part of the conditioning. No
        # truncation: callers have checked the lengths, and an unchecked long text should fail
        # loudly rather than lose its end.
        ids = tokenizer(
            texts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
        ).input_ids
        return encoder(ids.to(self.device), output_hidden_states=True)

    @staticmethod
    def _pair(
        hidden: np.ndarray, pooled: np.ndarray, prompt_row: int, negative_row: int | None
    ) -> PromptEmbeddings:
        """One pair's arrays; a negative_row of None means an all-zero negative."""

        def rows(array: np.ndarray, row: int | None) -> np.ndarray:
            if row is None:
                return np.zeros_like(array[:1])
            # A copy, not a view: a view would keep the whole batch's buffer alive for as long
            # as one pair's embeddings sit in the encoder's cache or travel through Ray.
            return array[row : row + 1].copy()

        return PromptEmbeddings(
            prompt_embeds=rows(hidden, prompt_row),
            pooled_prompt_embeds=rows(pooled, prompt_row),
            negative_prompt_embeds=rows(hidden, negative_row),
            negative_pooled_prompt_embeds=rows(pooled, negative_row),
        )
