r"""Subject-driven accuracy of the nano Kosmos-G model, judged on held-out world scenes.

    python -m train.eval nano --samples 200 --seed 0 --json nano.json [--grid nano.png]

Models (shipped files, nothing is trained or downloaded here):
  --checkpoint     models/nano/kosmosg-nano.safetensors  Kosmos-G nano pack (train.export of the nano stage-3 run)
  --tokenizer      default: the tokenizer inside the checkpoint, else beside it (kosmosg_core.checkpoint)
  --sd-checkpoint  models/nano/nano-sd15.safetensors     nano U-Net + TAESD (train.nano.export_nano), read as
                                                         ``train.eval.nano-image`` reads it
  --text-encoder   models/nano/text-encoder              nano CLIP text encoder (the text-prompt ceiling only)

Cases: ``--samples N`` held-out target scenes (world.HELDOUT_SEED stream, held-out split only),
``N - N // 2`` with one subject and ``N // 2`` with two, scenes ``S * 1_000_000 ...`` for ``--seed S``
(the scenes nano-image draws). Each target is asked for by an interleaved prompt in the nano training
data's wording (train.data.nano_labels names each subject's entity "<colour> <shape>",
train.data.entities.layout_interleaved places its image; this is the caption-drop variant, where
the image stands for the subject words):
    "a <i> on the left, on grey"        "a <i> on the left and an <i> on the right, on white"
Each ``<i>`` is the world's masked crop (the subject on white, as in training) of a subject of the
same colour and shape from another held-out scene (scenes ``S * 1_000_000 + 500_000 ...``), of a
different size: a different instance, never the target's own. The world re-renders masked crops at
a fixed scale, so the subject image never shows the target's size or placement; copying it (a
43-px subject on white in the centre) cannot pass a two-subject case.

Generation: Kosmos-G ``encode`` (the condition) and ``encode_unconditional`` (the official ``<s>``
condition) -> ``train.nano.sampler`` with classifier-free guidance -> nano U-Net -> TAESD decode ->
``train.nano.judge``. Every condition of a case starts from the same initial noise.

Output (JSON; a table goes to stderr):
  single_subject_fidelity / two_subject_fidelity  fraction of generations judged to show every subject
        with its colour and shape at the position the text asks, and no other subject
        (judge.score_against's all_correct); subject_fidelity over all N
  text_fidelity            what the text asks: every subject at its position and the asked background
                           (judge.read_background); _position / _background each alone
  text_prompt_ceiling_single / _two   the same scenes from their true captions through the nano text
                           encoder (guidance against the empty caption): the image model's own limit
  text_only_baseline       the prompt with its images removed ("a on the left, on grey")
  random_baseline          the prompt and subject images of an unrelated held-out scene (same subject
                           count): chance for a model that draws well-formed subjects
  *_stderr                 binomial standard error sqrt(p (1 - p) / n)
  *_count / *_colour / *_shape / *_position   per-attribute fractions (subject-fidelity metrics)
  samples, seed, sampler settings, model paths, one example prompt per subject count (same flags ->
  same JSON)
``--grid OUT.png`` also writes one row per case (the first ``--grid-rows``): subject image(s), the
Kosmos-G generation, the true-caption generation, the target scene.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from train.nano import paths, world

from . import nano_image
from .cli import parse_eval_config

logger = logging.getLogger(__name__)

DESCRIPTION = "subject-driven accuracy of the nano Kosmos-G model on held-out scenes, judged (train/nano/judge.py)"
RANDOM_OFFSET = 250_000  # held-out scenes seed * SCENE_STRIDE + RANDOM_OFFSET ... : random-baseline conditions
DONOR_OFFSET = 500_000  # held-out scenes seed * SCENE_STRIDE + DONOR_OFFSET ... : where subject images come from
HOW_TO_MAKE = ("the Kosmos-G nano model is trained with python -m train.stage1 / train.stage2 / train.stage3 "
               "--config train/configs/nano/kosmosg-stageN.yaml and exported with python -m train.export "
               f"--checkpoint runs/nano/stage3 --out {paths.KOSMOSG_CHECKPOINT}")


@dataclass
class NanoKosmosGConfig(nano_image.NanoSamplingOptions):
    checkpoint: str = field(default=paths.KOSMOSG_CHECKPOINT,
                            metadata={"help": "Kosmos-G nano pack .safetensors, train.export's output"})
    tokenizer: str = field(default="", metadata={
        "help": "tokenizer folder (sentencepiece.bpe.model + dict.txt); default: inside the checkpoint, "
                "else beside it"})
    sd_checkpoint: str = field(default=paths.SD15_CHECKPOINT, metadata={
        "help": "nano SD1.5 single-file checkpoint (U-Net + TAESD), export_nano's output"})
    text_encoder: str = field(default=paths.SHIPPED_TEXT_ENCODER,
                              metadata={"help": "nano CLIPTextModel + tokenizer folder (text-prompt ceiling)"})


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True, eq=False)
class EvalCase:
    """One held-out request.

    target          the scene the prompt asks for (held-out split)
    prompt          interleaved text, one <i> per subject, left to right
    donors          per subject: (held-out scene spec, subject index) its image comes from
    subject_images  per subject: uint8 [64, 64, 3], the donor subject's masked crop
    """

    target: world.SceneSpec
    prompt: str
    donors: tuple[tuple[world.SceneSpec, int], ...]
    subject_images: tuple[np.ndarray, ...]

    @property
    def text_only_prompt(self) -> str:
        """The prompt with its images removed: what the text alone asks for."""
        from train.data.entities import clean_text

        return clean_text(self.prompt)  # clean_text removes the image placeholders


def interleaved_prompt(spec: world.SceneSpec) -> str:
    """A scene's prompt as the nano training data writes it, caption-drop variant ("a <i> on the left, on grey")."""
    from train.data.entities import layout_interleaved
    from train.data.nano_labels import entity_name

    layout = layout_interleaved(world.caption_of(spec), [entity_name(s) for s in spec.subjects])
    if len(layout.entities) != len(spec.subjects):
        raise ValueError(f"scene {spec.canonical()}: the data step placed {len(layout.entities)} images for "
                         f"{len(spec.subjects)} subjects; train.data.nano_labels and train.nano.world disagree")
    return layout.text_dropped


class SubjectImagePool:
    """Subjects of the held-out scenes ``seed * SCENE_STRIDE + DONOR_OFFSET`` onwards, each handed out once.

    ``take(subject)`` returns the first unused subject of the same colour and shape and a different
    size (a different instance), reading further scenes of the stream as needed.
    """

    def __init__(self, seed: int):
        self.next_index = int(seed) * nano_image.SCENE_STRIDE + DONOR_OFFSET
        self.unused: dict[tuple[str, str], list] = {}  # (colour, shape) -> [(spec, subject index), ...]

    def take(self, subject: world.SubjectSpec) -> tuple[world.SceneSpec, int]:
        waiting = self.unused.setdefault((subject.colour, subject.shape), [])
        while True:
            for i, (spec, k) in enumerate(waiting):
                if spec.subjects[k].size != subject.size:
                    return waiting.pop(i)
            spec = world.spec_at(world.HELDOUT_SEED, self.next_index)
            self.next_index += 1
            for k, s in enumerate(spec.subjects):
                self.unused.setdefault((s.colour, s.shape), []).append((spec, k))


def first_heldout_subject(colour: str, shape: str, start: int = 0) -> tuple[world.SceneSpec, int]:
    """The first subject of ``colour`` and ``shape`` in held-out scenes ``start, start + 1, ...``
    (world.HELDOUT_SEED stream) -> (scene spec, subject index). Its subject image, as training and
    this evaluation feed it, is ``world.render_scene(spec).masked_crops[index]``."""
    if colour not in world.COLOURS or shape not in world.SHAPES:
        raise ValueError(f"subject {colour!r} {shape!r} is not in the nano world; use a colour of "
                         f"{', '.join(world.COLOURS)} and a shape of {', '.join(world.SHAPES)}")
    index = int(start)
    while True:
        spec = world.spec_at(world.HELDOUT_SEED, index)
        for k, s in enumerate(spec.subjects):
            if (s.colour, s.shape) == (colour, shape):
                return spec, k
        index += 1


def make_cases(specs: list[world.SceneSpec], pool: SubjectImagePool) -> list[EvalCase]:
    """One EvalCase per target spec, subject images drawn from ``pool`` (in order: deterministic)."""
    cases = []
    for spec in specs:
        donors = tuple(pool.take(s) for s in spec.subjects)
        images = tuple(world.render_scene(donor).masked_crops[k] for donor, k in donors)
        cases.append(EvalCase(spec, interleaved_prompt(spec), donors, images))
    return cases


# ----------------------------------------------------------------------------- judging


def judge_generation(image, spec: world.SceneSpec) -> dict:
    """judge.score_against(image, spec.subjects) plus ``background`` (the asked background is read)
    and ``text`` (every subject at its asked position and the asked background)."""
    from train.nano import judge

    score = judge.score_against(image, spec.subjects)
    score["background"] = judge.read_background(image) == spec.background
    score["text"] = bool(score["position"] and score["background"])
    return score


def text_fractions(scores: list[dict], prefix: str) -> dict:
    """``prefix`` (fraction with ``text``), ``prefix_stderr``, ``prefix_position``, ``prefix_background``."""
    n = len(scores)
    p = sum(bool(s["text"]) for s in scores) / n
    out = {prefix: p, f"{prefix}_stderr": nano_image.binomial_stderr(p, n)}
    for attr in ("position", "background"):
        out[f"{prefix}_{attr}"] = sum(bool(s[attr]) for s in scores) / n
    return out


# ----------------------------------------------------------------------------- loading + encoding


def load_kosmosg(checkpoint: str, tokenizer: str):
    """KosmosGPipeline (float32, CPU) of the nano Kosmos-G pack; ValueError naming the flag if a file is missing."""
    from kosmosg_core.pipeline import KosmosGPipeline

    if not Path(checkpoint).exists():
        raise ValueError(f"--checkpoint {checkpoint}: Kosmos-G nano checkpoint not found; {HOW_TO_MAKE} "
                         f"(or pass --checkpoint PATH)")
    if tokenizer and not Path(tokenizer).is_dir():
        raise ValueError(f"--tokenizer {tokenizer}: not a folder; give the folder with sentencepiece.bpe.model + "
                         f"dict.txt (python -m train.nano.nano_tokenizer --out DIR writes it), or leave --tokenizer "
                         f"out to use the one inside the checkpoint")
    return KosmosGPipeline.from_checkpoint(checkpoint, tokenizer_dir=tokenizer or None)


def encode_cases(kosmos, prompts: list[str], images: list[list], batch_size: int) -> torch.Tensor:
    """Interleaved prompts + their images -> Kosmos-G conditions [N, 77, 768] float32, ``batch_size`` at a time."""
    out = [kosmos.encode(prompts[i:i + batch_size], images[i:i + batch_size])
           for i in range(0, len(prompts), batch_size)]
    return torch.cat(out).float()


# ----------------------------------------------------------------------------- run


def validate(cfg: NanoKosmosGConfig) -> None:
    if not 2 <= cfg.samples <= RANDOM_OFFSET:
        raise ValueError(f"--samples must be in [2, {RANDOM_OFFSET}] (half one-subject, half two-subject scenes), "
                         f"got {cfg.samples}")
    nano_image.validate_sampler(cfg)


def run(cfg: NanoKosmosGConfig) -> dict:
    from train.nano import text_encoder as te

    validate(cfg)
    torch.set_num_threads(max(1, cfg.num_threads))
    t0 = time.time()
    kosmos = load_kosmosg(cfg.checkpoint, cfg.tokenizer)
    unet, vae, text_model, tokenizer = nano_image.load_shipped_model(cfg.sd_checkpoint, cfg.text_encoder,
                                                                     checkpoint_flag="--sd-checkpoint")
    if kosmos.context_dim != unet.config.context_dim:
        raise ValueError(f"--checkpoint {cfg.checkpoint} writes [77, {kosmos.context_dim}] conditions but the nano "
                         f"U-Net of --sd-checkpoint {cfg.sd_checkpoint} reads [77, {unet.config.context_dim}]; use "
                         f"the nano Kosmos-G (768-wide aligner, train/configs/nano/kosmosg-nano.json)")
    kosmos_uncond = kosmos.encode_unconditional().float()  # [1, 77, 768], the official <s> condition
    empty_caption = te.encode_captions(text_model, tokenizer, [""])  # [1, 77, 768]

    pool = SubjectImagePool(cfg.seed)
    counts = {"single": (cfg.samples - cfg.samples // 2, 1), "two": (cfg.samples // 2, 2)}
    result: dict = {"examples": {}}
    totals: dict[str, list] = {"subject_fidelity": [], "text_only_baseline": [], "random_baseline": []}
    grid_rows = []
    for g, (name, (count, num_subjects)) in enumerate(counts.items()):
        cases = make_cases(nano_image.heldout_specs(count, num_subjects, cfg.seed), pool)
        random_cases = make_cases(nano_image.heldout_specs(count, num_subjects, cfg.seed, offset=RANDOM_OFFSET), pool)
        specs = [c.target for c in cases]
        noise_seed = int(cfg.seed) * 1_000 + 100 * g  # the same noise for every condition of a case

        def judged(context, uncond):
            images = nano_image.generate(unet, vae, context, uncond, cfg, noise_seed).numpy()  # [n, 64, 64, 3]
            return images, [judge_generation(img, spec) for img, spec in zip(images, specs)]

        images, kosmos_scores = judged(
            encode_cases(kosmos, [c.prompt for c in cases], [list(c.subject_images) for c in cases], cfg.batch_size),
            kosmos_uncond)
        caption_images, ceiling = judged(
            te.encode_captions(text_model, tokenizer, [world.caption_of(s) for s in specs]), empty_caption)
        _, text_only = judged(encode_cases(kosmos, [c.text_only_prompt for c in cases], [[] for _ in cases],
                                           cfg.batch_size), kosmos_uncond)
        _, random_scores = judged(encode_cases(kosmos, [c.prompt for c in random_cases],
                                               [list(c.subject_images) for c in random_cases], cfg.batch_size),
                                  kosmos_uncond)

        result.update(nano_image.score_fractions(kosmos_scores, f"{name}_subject_fidelity"))
        result.update(text_fractions(kosmos_scores, f"text_fidelity_{name}"))
        result.update(nano_image.score_fractions(ceiling, f"text_prompt_ceiling_{name}"))
        result.update(nano_image.score_fractions(text_only, f"text_only_baseline_{name}"))
        result.update(nano_image.score_fractions(random_scores, f"random_baseline_{name}"))
        result[f"samples_{name}"] = count
        result["examples"][name] = cases[0].prompt if cases else ""
        totals["subject_fidelity"] += kosmos_scores
        totals["text_only_baseline"] += text_only
        totals["random_baseline"] += random_scores
        if cfg.grid:
            rows = nano_image.grid_rows_for(name, cfg.grid_rows)
            grid_rows += [grid_row(c, img, cap) for c, img, cap in zip(cases, images, caption_images)][:rows]
    for prefix, scores in totals.items():
        result.update(nano_image.score_fractions(scores, prefix))
    result.update(text_fractions(totals["subject_fidelity"], "text_fidelity"))
    result.update({
        "samples": cfg.samples, "seed": cfg.seed,
        "sampler": {"method": cfg.method, "steps": cfg.steps, "guidance": cfg.guidance, "batch_size": cfg.batch_size,
                    "uncond": "Kosmos-G encode_unconditional (<s>); text ceiling: empty caption",
                    "latent_shape": [4, 8, 8]},
        "checkpoint": str(cfg.checkpoint), "tokenizer": cfg.tokenizer or "(inside the checkpoint)",
        "sd_checkpoint": str(cfg.sd_checkpoint), "text_encoder": str(cfg.text_encoder),
    })  # no wall time in the result: the same flags give byte-identical JSON
    logger.info("nano: %d scenes x 4 conditions in %.1f s", cfg.samples, time.time() - t0)
    nano_image.report(format_table(result), result, cfg.json)
    if cfg.grid:
        nano_image.write_grid(cfg.grid, grid_rows)
        logger.info("nano: wrote the grid %s (%d rows)", cfg.grid, len(grid_rows))
    return result


def format_table(result: dict) -> str:
    return nano_image.metric_table(result, [
        ("single_subject_fidelity", "samples_single"), ("two_subject_fidelity", "samples_two"),
        ("subject_fidelity", "samples"), ("text_fidelity", "samples"),
        ("text_prompt_ceiling_single", "samples_single"), ("text_prompt_ceiling_two", "samples_two"),
        ("text_only_baseline", "samples"), ("random_baseline", "samples")])


# ----------------------------------------------------------------------------- grid


def grid_row(case: EvalCase, generated: np.ndarray, from_caption: np.ndarray) -> list:
    """Cells of one grid row, uint8 [64, 64, 3] each (None = empty): subject 1, subject 2, the Kosmos-G
    generation, the true-caption generation, the target scene."""
    subjects = list(case.subject_images) + [None] * (2 - len(case.subject_images))
    return subjects + [nano_image.as_uint8(generated), nano_image.as_uint8(from_caption),
                       world.render_scene(case.target).image]


def main(argv=None) -> dict:
    return run(parse_eval_config(NanoKosmosGConfig, argv, "nano", __doc__))
