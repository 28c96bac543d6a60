"""PromptEncoder against diffusers' own SDXL `encode_prompt` on the built-in tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from shared.api.jobs import PromptEmbeddings
from shared.engine.prompts import PromptEncoder
from shared.errors import InvalidRequestError

PROMPT = "a photo of a cat sitting on a red chair"
NEGATIVE = "blurry, low quality"


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def encoder(tiny_model_dir: Path) -> PromptEncoder:
    return PromptEncoder.from_pretrained_dir(tiny_model_dir)


def reference(pipe, prompt: str, negative: str | None) -> PromptEmbeddings:
    """What diffusers computes for one pair (classifier-free guidance on, one image)."""
    with torch.no_grad():
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompt,
            negative_prompt=negative,
            do_classifier_free_guidance=True,
            num_images_per_prompt=1,
        )
    return PromptEmbeddings(
        prompt_embeds=embeds.float().numpy(),
        pooled_prompt_embeds=pooled.float().numpy(),
        negative_prompt_embeds=negative_embeds.float().numpy(),
        negative_pooled_prompt_embeds=negative_pooled.float().numpy(),
    )


def embeddings(result: PromptEmbeddings | InvalidRequestError) -> PromptEmbeddings:
    """The result of a pair that should have encoded, failing the test if it was refused."""
    assert isinstance(result, PromptEmbeddings), result
    return result


def assert_same(
    actual: PromptEmbeddings | InvalidRequestError, expected: PromptEmbeddings
) -> PromptEmbeddings:
    """Assert float32 arrays equal to `expected` (to 1e-6) and return `actual`, narrowed."""
    result = embeddings(actual)
    for name in (
        "prompt_embeds",
        "pooled_prompt_embeds",
        "negative_prompt_embeds",
        "negative_pooled_prompt_embeds",
    ):
        got, want = getattr(result, name), getattr(expected, name)
        assert got.dtype == np.float32, name
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=name)
    return result


def count_forwards(module: torch.nn.Module) -> list[int]:
    """Record the batch size of every forward call of `module`."""
    calls: list[int] = []
    module.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    return calls


def test_prompt_alone_matches_diffusers_with_zero_negative(
    pipe: StableDiffusionXLPipeline, encoder: PromptEncoder
) -> None:
    (raw,) = encoder.encode([(PROMPT, None)])

    result = assert_same(raw, reference(pipe, PROMPT, None))
    # Both tiny encoders' 32 features side by side; encoder 2's projection as the pooled vector.
    assert result.prompt_embeds.shape == (1, 77, 64)
    assert result.pooled_prompt_embeds.shape == (1, 32)
    assert not result.negative_prompt_embeds.any()
    assert not result.negative_pooled_prompt_embeds.any()


def test_prompt_and_negative_match_diffusers(
    pipe: StableDiffusionXLPipeline, encoder: PromptEncoder
) -> None:
    (raw,) = encoder.encode([(PROMPT, NEGATIVE)])

    result = assert_same(raw, reference(pipe, PROMPT, NEGATIVE))
    assert result.negative_prompt_embeds.any()


def test_empty_negative_is_zeros_like_an_omitted_one(
    pipe: StableDiffusionXLPipeline, encoder: PromptEncoder
) -> None:
    # diffusers zeroes only negative_prompt=None and would encode "" as text; we treat "" as
    # omitted, so the reference is diffusers' None.
    (raw,) = encoder.encode([(PROMPT, "")])

    result = assert_same(raw, reference(pipe, PROMPT, None))
    assert not result.negative_prompt_embeds.any()


def test_without_force_zeros_an_omitted_negative_encodes_empty_text(
    pipe: StableDiffusionXLPipeline, encoder: PromptEncoder
) -> None:
    plain = PromptEncoder(
        *encoder.tokenizers, *encoder.text_encoders, force_zeros_for_empty_prompt=False
    )

    omitted, empty = plain.encode([(PROMPT, None), (PROMPT, "")])

    expected = reference(pipe, PROMPT, "")
    assert_same(omitted, expected)
    assert_same(empty, expected)
    assert expected.negative_prompt_embeds.any()


def test_batch_is_one_forward_per_encoder_and_equals_each_alone(
    pipe: StableDiffusionXLPipeline, tiny_model_dir: Path
) -> None:
    encoder = PromptEncoder.from_pretrained_dir(tiny_model_dir)
    calls = [count_forwards(module) for module in encoder.text_encoders]
    pairs = [(PROMPT, None), ("an astronaut riding a horse", NEGATIVE), ("a red house", NEGATIVE)]

    batched = encoder.encode(pairs)

    # Four distinct texts (three prompts, one shared negative) in one pass through each encoder.
    assert calls == [[4], [4]]
    for pair, result in zip(pairs, batched, strict=True):
        (alone,) = encoder.encode([pair])
        assert_same(result, embeddings(alone))
        assert_same(result, reference(pipe, *pair))


def test_too_long_prompt_fails_only_its_own_pair(
    pipe: StableDiffusionXLPipeline, encoder: PromptEncoder
) -> None:
    long_prompt = "x" * 94  # no merges for "x" in the tiny vocabulary: one token per character
    pairs = [(PROMPT, None), (long_prompt, None), ("a red house", "q" * 80)]

    good, too_long, bad_negative = encoder.encode(pairs)

    assert_same(good, reference(pipe, PROMPT, None))
    assert isinstance(too_long, InvalidRequestError)
    assert (too_long.status, too_long.code, too_long.param) == (422, "prompt_too_long", "prompt")
    assert too_long.message == (
        "prompt is 96 tokens long; this model's text encoders take at most 77 "
        "(including start/end tokens). Shorten the prompt."
    )
    assert isinstance(bad_negative, InvalidRequestError)
    assert (bad_negative.code, bad_negative.param) == ("prompt_too_long", "negative_prompt")
    assert "82 tokens" in bad_negative.message


def test_all_pairs_too_long_runs_no_encoder(tiny_model_dir: Path) -> None:
    encoder = PromptEncoder.from_pretrained_dir(tiny_model_dir)
    calls = [count_forwards(module) for module in encoder.text_encoders]

    results = encoder.encode([("x" * 200, None), (PROMPT, "x" * 200)])

    assert [type(r) for r in results] == [InvalidRequestError, InvalidRequestError]
    assert calls == [[], []]


def test_the_window_is_77_tokens_including_start_and_end(encoder: PromptEncoder) -> None:
    assert encoder.max_tokens == 77
    fits, too_long = encoder.encode([("x" * 75, None), ("a cat", "x" * 76)])

    assert not isinstance(fits, InvalidRequestError)  # 75 + start + end = 77
    assert isinstance(too_long, InvalidRequestError)
    assert (too_long.code, too_long.param) == ("prompt_too_long", "negative_prompt")
    assert too_long.message.startswith("negative_prompt is 78 tokens long;")


def test_lengths_are_counted_in_tokens_not_characters(encoder: PromptEncoder) -> None:
    # "red" is a whole word in the tiny vocabulary: one token, not three characters.
    fits, too_long = encoder.encode(
        [(" ".join(["red"] * 75), None), (" ".join(["red"] * 76), None)]
    )

    assert not isinstance(fits, InvalidRequestError)
    assert isinstance(too_long, InvalidRequestError)
    assert too_long.message.startswith("prompt is 78 tokens long;")


def test_from_pretrained_dir_reads_force_zeros_from_model_index(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["force_zeros_for_empty_prompt"] is True
    assert PromptEncoder.from_pretrained_dir(tiny_model_dir).force_zeros_for_empty_prompt

    (tmp_path / "model_index.json").write_text(
        json.dumps({**index, "force_zeros_for_empty_prompt": False})
    )
    for part in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"):
        (tmp_path / part).symlink_to(tiny_model_dir / part)
    encoder = PromptEncoder.from_pretrained_dir(tmp_path)

    assert encoder.force_zeros_for_empty_prompt is False
    (result,) = encoder.encode([(PROMPT, None)])
    assert embeddings(result).negative_prompt_embeds.any()


def test_half_precision_encoders_return_float32(
    encoder: PromptEncoder, tiny_model_dir: Path
) -> None:
    # bfloat16 has no numpy dtype, so this fails unless results are upcast before .numpy().
    half = PromptEncoder.from_pretrained_dir(tiny_model_dir, dtype=torch.bfloat16)
    assert half.text_encoders[0].dtype == torch.bfloat16

    (result,) = half.encode([(PROMPT, NEGATIVE)])
    (full,) = encoder.encode([(PROMPT, NEGATIVE)])

    half_embeds = embeddings(result).prompt_embeds
    assert half_embeds.dtype == np.float32
    np.testing.assert_allclose(half_embeds, embeddings(full).prompt_embeds, atol=0.1)
