"""Parity: `KosmosGPipeline` (kosmosg_core) == the official conditioning path, re-expressed independently.

For a random checkpoint written in the official fairseq on-disk layout (`checkpoint_final.pt`
keys under "model"), the pack loads it through its own loader and encodes prompts. The result
is compared, in float32 with atol 1e-4, with `tests/reference/official_reference.py`. That
reference loads the same official state dict into modules built with the official names and
conventions: PyPI torchscale layers, sequence-first activations, the fairseq connector path. It
also builds its inputs with the official app transforms (`kosmosg_preprocess`, the torchvision
image transform) from the raw tokenizer files.

Two sizes are tested: the `tiny` config (odd head widths, 4 image slots) and a "medium" config
with 64-wide heads, several heads per attention and 64 image slots. The medium file is a full
fairseq training checkpoint, and it is loaded without a config, so its sizes are read from the
tensor shapes, as for a real official file.

A failure message names the first component that diverges: inputs, vision tokens, connector,
MLLM hidden state, or aligner. Each component is fed the reference's inputs, so one
component's error does not spread into the ones after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from kosmosg_core.config import AlignerConfig, ConnectorConfig, DecoderConfig, KosmosGConfig, VisionConfig
from kosmosg_core.pipeline import KosmosGPipeline
from kosmosg_core.prompt import build_prompt_ids, build_unconditional_ids
from kosmosg_core.tokenizer import KosmosGTokenizer
from reference.official_reference import (
    OfficialKosmosGReference,
    OfficialTextTransform,
    official_image_transform,
    official_preprocess,
    right_pad_batch,
)
from support.official_checkpoint import build_official_state_dict, save_official_checkpoint
from support.tokenizer_fixture import build_tiny_tokenizer

ATOL = 1e-4


def medium_config(vocab_size: int) -> KosmosGConfig:
    """64-wide heads everywhere (like the official model), several heads, 64 slots; a few seconds on 1 thread."""
    return KosmosGConfig(
        vision=VisionConfig(image_size=56, patch_size=14, width=128, layers=2, heads=2),
        connector=ConnectorConfig(num_queries=64, heads=4),
        decoder=DecoderConfig(vocab_size=vocab_size, width=256, layers=3, heads=4, ffn_width=1024, max_positions=2048),
        aligner=AlignerConfig(width=128, heads=2, ffn_width=512, encoder_layers=2, decoder_layers=2, max_positions=1024),
        image_token_slots=64,
    )


@dataclass
class Setup:
    name: str
    cfg: KosmosGConfig
    pipe: KosmosGPipeline
    ref: OfficialKosmosGReference
    text_transform: OfficialTextTransform
    image_transform: object

    def ref_inputs(self, prompt: str, images: list, negative_prompt: str = ""):
        ids, mask, negative = official_preprocess(
            self.text_transform, prompt, negative_prompt, len(images), self.text_transform.bos_id,
            self.text_transform.boi_id, self.text_transform.eoi_id, image_token_length=self.cfg.image_token_slots)
        pixels = torch.stack([torch.tensor(self.image_transform(im)) for im in images]) if images else None
        return ids, mask, pixels, negative


@pytest.fixture(scope="module", params=["tiny", "medium"])
def setup(request, tmp_path_factory) -> Setup:
    directory = tmp_path_factory.mktemp(f"parity-{request.param}")
    tok_dir = build_tiny_tokenizer(directory / "tokenizer")
    vocab_size = KosmosGTokenizer.from_dir(tok_dir).vocab_size
    if request.param == "tiny":
        cfg = KosmosGConfig.tiny(vocab_size=vocab_size, context_dim=32)
        given_config = cfg  # tiny heads are not 64 wide: shapes alone cannot tell the head counts
    else:
        cfg = medium_config(vocab_size)
        given_config = None  # sizes inferred from the official tensors' shapes
    state_dict = build_official_state_dict(cfg, seed=1234, dtype=torch.float32)
    path = directory / "checkpoint_final.pt"
    # medium: a full fairseq training file (omegaconf cfg, optimizer state, ...); tiny: a stripped {"model": ...}
    save_official_checkpoint(path, state_dict, with_training_state=request.param == "medium")
    pipe = KosmosGPipeline.from_checkpoint(path, tokenizer_dir=tok_dir, dtype="float32", config=given_config)
    ref = OfficialKosmosGReference.from_official_state_dict(state_dict, cfg)
    text_transform = OfficialTextTransform(tok_dir / "sentencepiece.bpe.model", tok_dir / "dict.txt")
    return Setup(request.param, cfg, pipe, ref, text_transform, official_image_transform(cfg.vision.image_size))


def image(seed: int, size=(45, 70)) -> Image.Image:
    """Random RGB image, not square and not the model's size, so resize and crop matter."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


@torch.no_grad()
def divergence_report(s: Setup, prompt: str, images: list) -> str:
    """Compare the pack's intermediates with the reference's, each stage fed the reference's inputs."""
    ids, mask, pixels, _ = s.ref_inputs(prompt, images)
    trace = s.ref.trace(ids, mask, pixels)
    model = s.pipe.model
    lines = []
    ours = build_prompt_ids(s.pipe.tokenizer, prompt, len(images), image_slots=s.cfg.image_token_slots)
    lines.append(f"prompt ids equal: {ours.ids == ids[0].tolist()}; image mask equal: {ours.image_mask == mask[0].tolist()}")
    if pixels is not None:
        from kosmosg_core.image_processing import preprocess_images

        lines.append(f"preprocessed pixels max|diff| {max_diff(preprocess_images(images, s.cfg.vision.image_size), pixels):.3g}")
        lines.append(f"vision tokens max|diff| {max_diff(model.vision(pixels.float()), trace['vision_tokens']):.3g}")
        embeds = model.connector(trace["vision_tokens"])  # [N, Q, D]
        lines.append(f"connector max|diff| {max_diff(embeds.reshape(-1, embeds.shape[-1]), trace['connector']):.3g}")
        ref_embeds = trace["connector"].view(pixels.shape[0], -1, trace["connector"].shape[-1])
    else:
        ref_embeds = None
    hidden = model.mllm_hidden(ids, mask, ref_embeds)
    lines.append(f"MLLM hidden max|diff| {max_diff(hidden, trace['mllm_hidden']):.3g}")
    cond = model.aligner(trace["mllm_hidden"], padding_mask=ids.eq(1))
    lines.append(f"aligner max|diff| {max_diff(cond, trace['condition']):.3g}")
    return "\n".join(lines)


def assert_parity(s: Setup, prompt: str, images: list, actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape, f"[{s.name}] shape {tuple(actual.shape)} != reference {tuple(expected.shape)}"
    diff = max_diff(actual, expected)
    if diff > ATOL:
        pytest.fail(f"[{s.name}] {prompt!r} with {len(images)} image(s): max|diff| {diff:.3g} > {ATOL}\n"
                    + divergence_report(s, prompt, images))


# --- inputs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt, num_images", [
    ("a dog sitting on the beach", 0),
    ("a cat <i> on the moon", 1),
    ("<i> and <i> as an oil painting", 2),
    ("<i><i>", 2),
    ("  the robot <i>   wearing sunglasses <i> ", 2),
    ("", 0),
    ("zebra XYZ 42 <i>!", 1),  # pieces outside the tiny vocabulary -> <unk>
])
def test_prompt_ids_match_official_preprocess(setup, prompt, num_images):
    ids, mask, _ = official_preprocess(setup.text_transform, prompt, "", num_images, setup.text_transform.bos_id,
                                       setup.text_transform.boi_id, setup.text_transform.eoi_id,
                                       image_token_length=setup.cfg.image_token_slots)
    ours = build_prompt_ids(setup.pipe.tokenizer, prompt, num_images, image_slots=setup.cfg.image_token_slots)
    assert ours.ids == ids[0].tolist()
    assert ours.image_mask == mask[0].tolist()


@pytest.mark.parametrize("negative", ["", "watercolor sketch", "   "])
def test_unconditional_ids_match_official(setup, negative):
    negative_tokens = official_preprocess(setup.text_transform, "", negative, 0, 0, setup.text_transform.boi_id,
                                          setup.text_transform.eoi_id)[2]
    expected = max(torch.LongTensor([[0]]), negative_tokens, key=lambda x: x.shape[1])  # encode_condition
    assert build_unconditional_ids(setup.pipe.tokenizer, negative).ids == expected[0].tolist()


def test_image_preprocessing_matches_official_transform(setup):
    from kosmosg_core.image_processing import preprocess_images

    images = [image(0), image(1, size=(90, 40)), image(2, size=(setup.cfg.vision.image_size,) * 2)]
    expected = torch.stack([torch.tensor(setup.image_transform(im)) for im in images])
    torch.testing.assert_close(preprocess_images(images, setup.cfg.vision.image_size), expected.float(),
                               atol=1e-6, rtol=0)


def test_loaded_config_matches_the_official_one(setup):
    """The medium file is read without a config: every size and head count must come out right."""
    loaded, cfg = setup.pipe.model.cfg, setup.cfg
    assert (loaded.vision.width, loaded.vision.heads, loaded.vision.layers, loaded.vision.image_size) == \
        (cfg.vision.width, cfg.vision.heads, cfg.vision.layers, cfg.vision.image_size)
    assert (loaded.decoder.width, loaded.decoder.heads, loaded.decoder.layers, loaded.decoder.ffn_width) == \
        (cfg.decoder.width, cfg.decoder.heads, cfg.decoder.layers, cfg.decoder.ffn_width)
    assert loaded.connector.heads == cfg.decoder.heads  # official XConnector uses decoder_attention_heads
    assert (loaded.aligner.width, loaded.aligner.heads, loaded.aligner.encoder_layers, loaded.aligner.decoder_layers) == \
        (cfg.aligner.width, cfg.aligner.heads, cfg.aligner.encoder_layers, cfg.aligner.decoder_layers)
    assert loaded.image_token_slots == cfg.image_token_slots


# --- components (each fed the reference's own inputs) ------------------------------------------
@torch.no_grad()
def test_vision_and_connector_match(setup):
    ids, mask, pixels, _ = setup.ref_inputs("<i> and <i>", [image(3), image(4)])
    trace = setup.ref.trace(ids, mask, pixels)
    model = setup.pipe.model
    vision = model.vision(pixels.float())
    assert max_diff(vision, trace["vision_tokens"]) <= ATOL, "vision tokens diverge"
    embeds = model.connector(trace["vision_tokens"])
    assert max_diff(embeds.reshape(-1, embeds.shape[-1]), trace["connector"]) <= ATOL, "connector diverges"


@torch.no_grad()
def test_mllm_and_aligner_match(setup):
    ids, mask, pixels, _ = setup.ref_inputs("a small bird <i> flying over the city street", [image(5)])
    trace = setup.ref.trace(ids, mask, pixels)
    model = setup.pipe.model
    embeds = trace["connector"].view(1, -1, trace["connector"].shape[-1])
    assert max_diff(model.mllm_hidden(ids, mask, embeds), trace["mllm_hidden"]) <= ATOL, "MLLM hidden state diverges"
    cond = model.aligner(trace["mllm_hidden"], padding_mask=ids.eq(1))
    assert max_diff(cond, trace["condition"]) <= ATOL, "aligner diverges"


# --- end to end through KosmosGPipeline --------------------------------------------------------
@pytest.mark.parametrize("prompt, seeds", [
    ("a dog sitting on the beach, photo, high quality", []),
    ("a cat <i> on the moon", [10]),
    ("<i> wearing <i> in the style of van gogh", [11, 12]),
])
def test_encode_matches_official(setup, prompt, seeds):
    images = [image(seed) for seed in seeds]
    actual = setup.pipe.encode(prompt, images)
    ids, mask, pixels, _ = setup.ref_inputs(prompt, images)
    expected = setup.ref.trace(ids, mask, pixels)["condition"]
    assert expected.shape == (1, 77, setup.cfg.aligner.width)
    assert_parity(setup, prompt, images, actual, expected)


@pytest.mark.parametrize("negative", ["", "watercolor sketch, blurry"])
def test_unconditional_matches_official(setup, negative):
    actual = setup.pipe.encode_unconditional(negative, batch_size=2)
    negative_tokens = setup.ref_inputs("", [], negative)[3]
    expected = setup.ref.unconditional(negative_tokens)
    assert actual.shape == (2, 77, setup.cfg.aligner.width)
    for row in actual:
        assert max_diff(row, expected[0]) <= ATOL, f"[{setup.name}] unconditional({negative!r}) diverges"


def test_batch_of_different_lengths_matches_official(setup):
    prompts = ["a dog", "an old man <i> standing near a snowy mountain at night with neon lights", "<i> next to <i>"]
    images = [[], [image(20)], [image(21), image(22)]]
    batch = setup.pipe.encode(prompts, images)
    assert batch.shape == (3, 77, setup.cfg.aligner.width)

    rows, all_pixels = [], []
    for k, (prompt, imgs) in enumerate(zip(prompts, images)):
        ids, mask, pixels, _ = setup.ref_inputs(prompt, imgs)
        expected = setup.ref.trace(ids, mask, pixels)["condition"]
        assert_parity(setup, prompt, imgs, batch[k:k + 1], expected)  # row == official single prompt
        assert max_diff(batch[k:k + 1], setup.pipe.encode(prompt, imgs)) <= ATOL  # row == pack single prompt
        rows.append((ids, mask))
        if pixels is not None:
            all_pixels.append(pixels)
    # the official batched evaluation: right-pad ids with <pad> and the mask with 0, images in prompt order
    ids, mask = right_pad_batch(rows)
    assert ids.shape[1] > rows[0][0].shape[1]  # the batch really pads the short prompt
    official_batch = setup.ref.trace(ids, mask, torch.cat(all_pixels))["condition"]
    assert max_diff(batch, official_batch) <= ATOL


def test_a_prompt_past_the_trained_length_is_encoded_as_the_official_code_encodes_it(setup, caplog):
    """The official code encodes prompts past the decoder's trained length (its sinusoidal positions are computed
    for any length; only the aligner's learned table ends): the pack did refuse them (a review found it). Past the
    trained length: the official output and a warning; past the aligner's table: a PromptError naming it."""
    from kosmosg_core.errors import PromptError

    words = setup.cfg.max_prompt_tokens + 20  # one token each ("a" is one piece), plus <s>
    prompt = " ".join(["a"] * words)
    if len(setup.pipe.tokenizer.encode(prompt)) + 1 > setup.cfg.max_readable_tokens:  # medium: its aligner is shorter
        with pytest.raises(PromptError, match=r"tokens long .* reads at most \d+ \(its aligner's position table\)"):
            setup.pipe.encode(prompt, [])
        return
    with caplog.at_level("WARNING", logger="kosmosg_core.pipeline"):
        actual = setup.pipe.encode(prompt, [])
    assert f"past the {setup.cfg.max_prompt_tokens} the model was trained on" in caplog.text
    ids, mask, pixels, _ = setup.ref_inputs(prompt, [])
    assert_parity(setup, prompt, [], actual, setup.ref.trace(ids, mask, pixels)["condition"])
