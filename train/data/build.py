"""`build`: images (+ optional captions) -> caption -> entities -> masks -> interleaved samples.

Per item outcomes (counted per shard and in summary.json): written, skipped_corrupt,
failed_caption (no caption and none could be generated), failed_entities (LLM error),
no_entities (no usable entity word after the official filters), failed_segmentation (CLIPSeg
error), no_masks (no entity mask above the threshold), failed_labels (a label source raised),
unreadable_caption (a given caption file is not UTF-8 text or cannot be opened).
Nothing but a configuration error stops the run.
"""

from __future__ import annotations

import dataclasses
import logging
import random

import numpy as np
import torch
from PIL import Image

from train.common.config import check_minimums
from train.common.seeds import derive_seed

from .config import BuildConfig
from .crops import CorruptImageError, center_square, decode_image, entity_crops, RESAMPLE, resize_shorter_side
from .entities import (clean_text, converter_tags, filter_entities, order_entities, parse_entity_answer,
                       place_entities)
from .samples import openimage_sample
from .shards import ProcessResult, run_sharded
from .sources import (EntityLabel, LabelItem, RawItem, Scene, is_label_source, iter_label_items,
                      iter_raw_items, load_label_source)

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class ModelLabeller:
    """Captioner + entity LLM + segmenter, loaded once, each from its own path."""

    def __init__(self, config: BuildConfig):
        from .models import Captioner, EntityExtractor, Segmenter

        models = config.models
        if not models.entity_model or not models.segmenter:
            raise ValueError("build from images needs --entity-model DIR and --segmenter DIR "
                             "(transformers save_pretrained folders), or a label source via --source")
        self.captioner = None
        if models.captioner:
            self.captioner = Captioner(models.captioner, models.captioner_processor, models.device, models.dtype,
                                       models.caption_max_new_tokens, models.caption_prompt)
        self.extractor = EntityExtractor(
            models.entity_model, models.entity_prompt, models.device, models.dtype, models.entity_max_new_tokens,
            models.entity_do_sample, models.entity_temperature, models.entity_top_k, models.entity_top_p)
        self.segmenter = Segmenter(models.segmenter, models.device, models.dtype)
        self.config = config
        self._warned_no_captioner = False

    def caption(self, image: Image.Image, given: str | None, key: str) -> str | None:
        if given and not self.config.models.recaption:
            return clean_text(given)
        if self.captioner is None:
            if not self._warned_no_captioner:
                logger.warning("images without captions are skipped: no --captioner was given")
                self._warned_no_captioner = True
            return None
        try:
            return clean_text(self.captioner(image)) or None
        except Exception as error:  # noqa: BLE001 - model failure on one item is counted, not fatal
            logger.warning("%s: captioning failed (%s: %s); skipped", key, type(error).__name__, error)
            return None


def _fit_scene(scene: Scene, square: bool) -> Scene:
    """Centre-crop the image (and its masks) to a square when configured."""
    if not square or scene.image.width == scene.image.height:
        return scene
    width, height = scene.image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    entities = [EntityLabel(e.name, None if e.mask is None else e.mask[top:top + side, left:left + side],
                            e.crop, e.masked) for e in scene.entities]
    return Scene(scene.key, center_square(scene.image), scene.caption, entities, scene.origin)


def _placed_labels(labels: list[EntityLabel], caption: str) -> list[EntityLabel]:
    """The stored labels the official loader places, in caption order. Names pass its filter once each, so
    entities of one name in a labelled scene (two dogs) are not ambiguous with each other: the k-th of a name
    takes the name's k-th mention (one past the mentions is left out)."""
    kept = set(filter_entities(list(dict.fromkeys(label.name for label in labels)), caption))
    named = [label for label in labels if label.name in kept]
    layout = place_entities(caption, order_entities([label.name for label in named], caption))
    remaining = list(named)
    placed = []
    for name in layout.entities:  # the j-th placed `name` is the j-th label of that name
        label = next(label for label in remaining if label.name == name)
        remaining.remove(label)
        placed.append(label)
    return placed


def finish_scene(scene: Scene, config: BuildConfig) -> ProcessResult:
    """Labelled scene -> `openimage` sample (official crop recipe for masks, layout, target)."""
    crop_cfg = config.crop
    scene = _fit_scene(scene, crop_cfg.square_crop)
    caption = clean_text(scene.caption)
    if not caption:
        return None, "failed_caption"
    # the official converter: tags found in the caption as written, cropped from their masks; those with a
    # crop are stored; then the official loader's filter and layout over the stored ones
    names = set(converter_tags([entity.name for entity in scene.entities], caption))
    if not names:
        return None, "no_entities"
    crops = {}  # id(label) -> (crop, masked crop)
    for entity in scene.entities:
        if entity.name not in names:
            continue
        if entity.mask is not None:
            pair = entity_crops(scene.image, np.asarray(entity.mask, dtype=np.float32), crop_cfg.mask_threshold,
                                crop_cfg.dilation_divisor, crop_cfg.entity_size)
        elif entity.crop is not None:
            size = (crop_cfg.entity_size, crop_cfg.entity_size)
            crop = entity.crop.convert("RGB").resize(size, RESAMPLE)
            masked = (entity.masked or entity.crop).convert("RGB").resize(size, RESAMPLE)
            pair = (crop, masked)
        else:
            pair = None
        if pair is not None:
            crops[id(entity)] = pair
    if not crops:
        return None, "no_masks"
    stored = [entity for entity in scene.entities if id(entity) in crops]
    placed = _placed_labels(stored, caption)[: config.models.max_entities or None]
    if not placed:
        return None, "no_entities"
    layout = place_entities(caption, [entity.name for entity in placed])
    pairs = [crops[id(entity)] for entity in placed]
    if crop_cfg.square_crop:
        target = scene.image.resize((crop_cfg.target_size, crop_cfg.target_size), RESAMPLE)
    else:
        target = resize_shorter_side(scene.image, crop_cfg.target_size)
    return openimage_sample(scene.key, caption, layout, target, pairs, scene.origin), "written"


def make_raw_processor(config: BuildConfig, labeller: ModelLabeller):
    def process(item: RawItem) -> ProcessResult:
        if item.caption_error and not config.models.recaption:  # recaptioned anyway: the given one is not read
            logger.warning("%s: %s; skipped", item.key, item.caption_error)
            return None, "unreadable_caption"
        try:
            image = decode_image(item.read(), item.origin)
        except (CorruptImageError, OSError) as error:
            logger.warning("%s: %s; skipped", item.key, error)
            return None, "skipped_corrupt"
        if config.crop.square_crop:
            image = center_square(image)
        seed_everything(derive_seed(config.seed, item.key))  # per item: independent of order and sharding
        caption = labeller.caption(image, item.caption, item.key)
        if not caption:
            return None, "failed_caption"
        try:
            answer = labeller.extractor(caption)
        except Exception as error:  # noqa: BLE001
            logger.warning("%s: entity extraction failed (%s: %s); skipped", item.key, type(error).__name__, error)
            return None, "failed_entities"
        tags = parse_entity_answer(answer, config.models.entity_max_words)
        names = converter_tags(tags, caption)  # all of them segmented, as the official converter does
        if not names:
            logger.debug("%s: no usable entity in %r for caption %r", item.key, answer, caption)
            return None, "no_entities"
        try:
            masks = labeller.segmenter(image, names)  # [E, H, W]
        except Exception as error:  # noqa: BLE001
            logger.warning("%s: segmentation failed (%s: %s); skipped", item.key, type(error).__name__, error)
            return None, "failed_segmentation"
        scene = Scene(item.key, image, caption, [EntityLabel(n, m) for n, m in zip(names, masks)], item.origin)
        return finish_scene(scene, config)
    return process


def make_label_processor(config: BuildConfig):
    def process(item: LabelItem) -> ProcessResult:
        try:
            scene = item.source.scene(item.index)
        except Exception as error:  # noqa: BLE001
            logger.warning("%s: label source failed (%s: %s); skipped", item.key, type(error).__name__, error)
            return None, "failed_labels"
        scene = Scene(item.key, scene.image.convert("RGB"), scene.caption, scene.entities, scene.origin)
        return finish_scene(scene, config)
    return process


def run_build(config: BuildConfig) -> dict:
    """Run `build` and return the summary (also written to OUTPUT/summary.json)."""
    if not config.output:
        raise ValueError("output is not set: pass --output DIR for the shards")
    check_minimums(config.crop, label=lambda name: f"crop.{name}")
    if not 0.0 < config.crop.mask_threshold < 1.0:
        raise ValueError(f"crop.mask_threshold={config.crop.mask_threshold}: must lie between 0 and 1 (official 0.3).")
    if is_label_source(config.source):
        source = load_label_source(config.source, config.seed, config.count, config.source_options)
        items = iter_label_items(source, config.count)
        process = make_label_processor(config)
    else:
        items = iter_raw_items(config.input, config.source, config.captions_file, config.count)
        process = make_raw_processor(config, ModelLabeller(config))
    return run_sharded(items, process, config.output, config.samples_per_shard, config.shard_prefix, what="build",
                       settings=dataclasses.asdict(config))
