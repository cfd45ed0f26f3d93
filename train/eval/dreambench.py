r"""DreamBench subject-driven evaluation: generate with Kosmos-G + SD1.5, then score DINO, CLIP-I, CLIP-T.

    python -m train.eval dreambench --data DREAMBENCH --generated OUT --checkpoint kosmosg.safetensors \
        --sd-model sd15/ --dino-model dino-vits16/ --clip-model clip-vit-base-patch32/
    python -m train.eval dreambench --data DREAMBENCH --generated OUT --dino-model ... --clip-model ...   # score only

Dataset layout (--data), as in google/dreambooth's `dataset/` folder:
    DATA/<subject>/<id>.jpg      reference images of one subject (any of .jpg .png .jpeg .webp .bmp)
    DATA/prompts.json            optional; without it the 30 DreamBench subjects and 25 prompts are built in:
        {"subjects": {"<subject>": {"class": "backpack", "live": false}, ...},
         "object_prompts": ["a {} in the jungle", ...], "live_prompts": ["a {} wearing a red hat", ...]}
With --checkpoint: every (subject, reference image, prompt) gets --num-images images, conditioned on
that one reference (official eval: `<i>` alone stands for the subject, e.g. "<i> in the jungle").
Generated files are named `<subject>+<reference id>+<index>+<prompt>.png` (the official script's
names), so a folder generated elsewhere with the same names is scored the same way; existing files are
kept (an interrupted run resumes). Scores (cosine similarities, 1.0 = identical features):
    dino / clip_i     generated image vs the reference it was conditioned on (official Kosmos-G eval)
    *_all_pairs       generated image vs every reference of its subject (DreamBooth paper's protocol)
    clip_t            generated image vs the prompt with the class noun for the subject ("a backpack in the jungle")
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kosmosg_core.files import write_json
from train.common.walk import IMAGE_SUFFIXES

from .cli import image_side_field, parse_eval_config
from .images import list_images, load_rgb

logger = logging.getLogger(__name__)

DESCRIPTION = "DreamBench: generate subject-driven images and/or score DINO, CLIP-I, CLIP-T"

# --- the benchmark's facts (google/dreambooth dataset; the official Kosmos-G eval uses the same) -----
SUBJECT_CLASSES = {
    "backpack": "backpack", "backpack_dog": "backpack", "bear_plushie": "stuffed animal", "berry_bowl": "bowl",
    "can": "can", "candle": "candle", "clock": "clock", "colorful_sneaker": "sneaker", "duck_toy": "toy",
    "fancy_boot": "boot", "grey_sloth_plushie": "stuffed animal", "monster_toy": "toy",
    "pink_sunglasses": "glasses", "poop_emoji": "toy", "rc_car": "toy", "red_cartoon": "cartoon",
    "robot_toy": "toy", "shiny_sneaker": "sneaker", "teapot": "teapot", "vase": "vase",
    "wolf_plushie": "stuffed animal",
    "cat": "cat", "cat2": "cat", "dog": "dog", "dog2": "dog", "dog3": "dog", "dog5": "dog", "dog6": "dog",
    "dog7": "dog", "dog8": "dog",
}
LIVE_SUBJECTS = {"cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"}
_SHARED_SCENES = ["in the jungle", "in the snow", "on the beach", "on a cobblestone street", "on top of pink fabric",
                  "on top of a wooden floor", "with a city in the background", "with a mountain in the background",
                  "with a blue house in the background", "on top of a purple rug in a forest"]
_OBJECT_SCENES = ["with a wheat field in the background", "with a tree and autumn leaves in the background",
                  "with the Eiffel Tower in the background", "floating on top of water",
                  "floating in an ocean of milk", "on top of green grass with sunflowers around it",
                  "on top of a mirror", "on top of the sidewalk in a crowded street", "on top of a dirt road",
                  "on top of a white rug"]
_LIVE_SCENES = ["wearing a red hat", "wearing a santa hat", "wearing a rainbow scarf",
                "wearing a black top hat and a monocle", "in a chef outfit", "in a firefighter outfit",
                "in a police outfit", "wearing pink glasses", "wearing a yellow shirt", "in a purple wizard outfit"]
_ATTRIBUTES = ["red", "purple", "shiny", "wet", "cube shaped"]
OBJECT_PROMPTS = [f"a {{}} {s}" for s in _SHARED_SCENES + _OBJECT_SCENES] + [f"a {a} {{}}" for a in _ATTRIBUTES]
LIVE_PROMPTS = [f"a {{}} {s}" for s in _SHARED_SCENES + _LIVE_SCENES] + [f"a {a} {{}}" for a in _ATTRIBUTES]
METRICS = ("dino", "clip_i", "clip_t")


def kosmosg_template(template: str) -> str:
    """DreamBench template -> the official Kosmos-G input template: "a {} in the snow" -> "{} in the snow",
    "a red {}" -> "{}, red" (the subject slot leads, attributes follow after a comma)."""
    if template.startswith("a {} ") or template.startswith("an {} "):
        return template.split(" ", 1)[1]
    attribute = re.fullmatch(r"an? (.+) \{\}", template)
    if attribute:
        return "{}, " + attribute.group(1)
    return template


@dataclass
class DreamBenchConfig:
    data: str = field(default="", metadata={"help": "DreamBench folder: one folder of reference images per subject "
                                                    "(+ optional prompts.json); see the layout above"})
    generated: str = field(default="", metadata={"help": "folder of generated images: written when --checkpoint is "
                                                         "given, else only read and scored"})
    checkpoint: str = field(default="", metadata={"help": "Kosmos-G checkpoint (.safetensors or official .pt); "
                                                          "empty = score the existing --generated folder"})
    tokenizer: str = field(default="", metadata={"help": "tokenizer folder; empty = inside / beside the checkpoint"})
    sd_model: str = field(default="", metadata={"help": "local SD1.5: diffusers folder or single .safetensors"})
    scheduler: str = field(default="dpm", metadata={"help": "dpm | ddim | pndm (official DreamBench: dpm)"})
    steps: int = field(default=100, metadata={"min": 1, "help": "sampling steps (official DreamBench: 100)"})
    guidance_scale: float = field(default=7.5, metadata={"help": "classifier-free guidance (official: 7.5)"})
    num_images: int = field(default=4, metadata={"min": 1, "help": "images per prompt and reference (official: 4)"})
    seed: int = field(default=0, metadata={"min": 0, "help": "image k of every prompt uses seed + k (official seed: 0)"})
    height: int | None = image_side_field("height")
    width: int | None = image_side_field("width")
    negative_prompt: str = field(default="", metadata={"help": "negative prompt (official: empty)"})
    drop_object: bool = field(default=True, metadata={"help": "true: '<i>' alone stands for the subject (official); "
                                                              "false: '<class> <i>'"})
    batch_size: int = field(default=4, metadata={"min": 1, "help": "prompts per sampling call"})
    dtype: str = field(default="float32", metadata={"help": "float32 | float16 | bfloat16 for generation"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available) | cpu | cuda | cuda:N"})
    subjects: list[str] = field(default_factory=list, metadata={"help": "comma list: only these subjects "
                                                                        "(empty = all)"})
    max_references: int = field(default=0, metadata={"min": 0, "help": "use at most N reference images per subject (0 = all)"})
    max_prompts: int = field(default=0, metadata={"min": 0, "help": "use the first N prompts per subject (0 = all 25)"})
    prompts_file: str = field(default="", metadata={"help": "prompts JSON; empty = DATA/prompts.json if present, "
                                                            "else the built-in DreamBench prompts"})
    dino_model: str = field(default="", metadata={"help": "local transformers ViTModel (dino-vits16) or Dinov2Model "
                                                          "folder"})
    dino_image_size: int = field(default=224, metadata={"min": 1, "help": "DINO input size (resize to size*256/224, crop)"})
    clip_model: str = field(default="", metadata={"help": "local transformers CLIPModel folder with its processor "
                                                          "(official: clip-vit-base-patch32)"})
    metrics: list[str] = field(default_factory=lambda: list(METRICS), metadata={"help": "comma list of dino, clip_i, "
                                                                                        "clip_t"})
    eval_batch_size: int = field(default=16, metadata={"min": 1, "help": "images per feature-extraction batch"})
    output_json: str = field(default="", metadata={"help": "metrics file; empty = GENERATED/dreambench_metrics.json"})


# --- the benchmark definition ------------------------------------------------------------------------
@dataclass
class Subject:
    name: str
    noun: str
    prompts: list[str]  # DreamBench templates with {} for the subject
    references: list[Path]


@dataclass
class Job:
    subject: str
    reference: Path
    index: int
    input_prompt: str  # Kosmos-G prompt with <i>
    text_prompt: str  # CLIP-T prompt with the class noun

    def file_name(self, k: int) -> str:
        return f"{self.subject}+{self.reference.stem}+p{self.index:02d}-{k}+{self.text_prompt}.png"


def read_prompts_file(cfg: DreamBenchConfig) -> dict:
    path = Path(cfg.prompts_file) if cfg.prompts_file else Path(cfg.data) / "prompts.json"
    if not path.is_file():
        if cfg.prompts_file:
            raise ValueError(f"--prompts-file {cfg.prompts_file}: no such file.")
        return {}
    layout = ('{"subjects": {"<folder>": {"class": "dog", "live": true} or "dog", ...}, "object_prompts": ["a {} '
              'in the snow", ...], "live_prompts": [...]}')
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # not JSON, or not UTF-8 text
        raise ValueError(f"prompts file {path}: not valid UTF-8 JSON ({e}); it should hold {layout}.") from e
    if not isinstance(spec, dict):
        raise ValueError(f"prompts file {path}: must hold an object, {layout}.")
    subjects = spec.get("subjects", {})
    if not isinstance(subjects, dict) or not all(
            isinstance(info, str) or (isinstance(info, dict) and isinstance(info.get("class"), str)
                                      and isinstance(info.get("live", False), bool)) for info in subjects.values()):
        raise ValueError(f"prompts file {path}: \"subjects\" must map each folder to its class noun or to "
                         f"{{\"class\": noun, \"live\": true/false}}; it should hold {layout}.")
    for key in ("object_prompts", "live_prompts"):
        if key in spec and not (isinstance(spec[key], list) and all(isinstance(t, str) for t in spec[key])):
            raise ValueError(f"prompts file {path}: \"{key}\" must be a list of prompt templates (each with one "
                             f"{{}} for the subject); it should hold {layout}.")
    return spec


def load_subjects(cfg: DreamBenchConfig) -> list[Subject]:
    """The subject folders under --data with their class noun, prompts and reference images."""
    data = Path(cfg.data)
    if not cfg.data or not data.is_dir():
        raise ValueError(f"--data {cfg.data!r}: not a folder; give the DreamBench folder (one folder of reference "
                         "images per subject).")
    spec = read_prompts_file(cfg)
    classes = {name: (info["class"] if isinstance(info, dict) else info)
               for name, info in spec.get("subjects", {}).items()}
    live = {name for name, info in spec.get("subjects", {}).items() if isinstance(info, dict) and info.get("live")}
    object_prompts = spec.get("object_prompts", OBJECT_PROMPTS)
    live_prompts = spec.get("live_prompts", LIVE_PROMPTS)
    names = sorted(p.name for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))
    if cfg.subjects:
        missing = sorted(set(cfg.subjects) - set(names))
        if missing:
            raise ValueError(f"--subjects {missing}: no such folders under --data {data}.")
        names = [n for n in names if n in cfg.subjects]
    if not names:
        raise ValueError(f"--data {data}: holds no subject folders.")
    subjects = []
    for name in names:
        noun = classes.get(name, SUBJECT_CLASSES.get(name))
        if noun is None:
            raise ValueError(f"subject {name!r} has no class noun: add it to {data / 'prompts.json'} as "
                             f'{{"subjects": {{"{name}": {{"class": "...", "live": false}}}}}}.')
        is_live = name in live or (name not in classes and name in LIVE_SUBJECTS)
        prompts = list(live_prompts if is_live else object_prompts)
        if cfg.max_prompts:
            prompts = prompts[:cfg.max_prompts]
        for template in prompts:
            if template.count("{}") != 1 or any(c in template for c in "+/"):
                raise ValueError(f"prompt {template!r}: needs exactly one {{}} for the subject and no '+' or '/'.")
        references = list_images(data / name, f"--data subject folder {name!r}")
        stems = [r.stem for r in references]
        for reference in references:  # the stem goes into the generated file names, '+'-separated
            if "+" in reference.stem:
                raise ValueError(f"reference {reference}: '+' separates the parts of the generated file names; "
                                 "rename the image without it.")
            if stems.count(reference.stem) > 1:
                raise ValueError(f"references of {name!r} share the name {reference.stem!r} "
                                 f"({', '.join(r.name for r in references if r.stem == reference.stem)}); their "
                                 "generated images would overwrite each other: rename one.")
        if cfg.max_references:
            references = references[:cfg.max_references]
        subjects.append(Subject(name, noun, prompts, references))
    return subjects


def build_jobs(subjects: list[Subject], drop_object: bool) -> list[Job]:
    jobs = []
    for subject in subjects:
        slot = "<i>" if drop_object else f"{subject.noun} <i>"
        for reference in subject.references:
            for index, template in enumerate(subject.prompts):
                jobs.append(Job(subject.name, reference, index, kosmosg_template(template).format(slot),
                                template.format(subject.noun)))
    return jobs


# --- generation --------------------------------------------------------------------------------------
# What makes the images (with the scheduler's settings: generation.folder_settings): a rerun into the same
# --generated (it keeps the images there) must use the same; the subset flags (subjects, max_*), the scoring models
# and the batch sizes may change.
GENERATION_SETTINGS = ("data", "checkpoint", "tokenizer", "sd_model", "scheduler", "steps", "guidance_scale",
                       "num_images", "seed", "height", "width", "negative_prompt", "drop_object", "dtype",
                       "prompts_file")


def generate(cfg: DreamBenchConfig, jobs: list[Job]) -> int:
    """Write every job's images that are not there yet -> number of images written."""
    from .generation import (KosmosGSampler, SamplingSettings, check_generated_folder, folder_settings,
                             record_generated_folder)

    from kosmosg_core.files import check_output_folder, save_image

    out = check_output_folder(cfg.generated, "--generated")
    generation = folder_settings(cfg, GENERATION_SETTINGS)
    check_generated_folder(out, generation)
    out.mkdir(parents=True, exist_ok=True)
    todo = [job for job in jobs if not all((out / job.file_name(k)).exists() for k in range(cfg.num_images))]
    logger.info("dreambench: %d of %d prompts to generate (%d images each)", len(todo), len(jobs), cfg.num_images)
    if not todo:
        return 0
    sampler = KosmosGSampler(cfg.checkpoint, cfg.sd_model, cfg.tokenizer, cfg.scheduler, cfg.dtype, cfg.device)
    generation = record_generated_folder(out, generation, sampler)
    settings = SamplingSettings(cfg.steps, cfg.guidance_scale, cfg.num_images, cfg.seed, generation["height"],
                                generation["width"], cfg.negative_prompt)
    written = 0
    for start in range(0, len(todo), cfg.batch_size):
        batch = todo[start:start + cfg.batch_size]
        results = sampler([job.input_prompt for job in batch], [[load_rgb(job.reference)] for job in batch], settings)
        for job, images in zip(batch, results):
            for k, image in enumerate(images):
                save_image(image, out / job.file_name(k))  # atomic: reruns skip existing files
                written += 1
        logger.info("dreambench: %d / %d prompts done", min(start + cfg.batch_size, len(todo)), len(todo))
    return written


# --- scoring -----------------------------------------------------------------------------------------
@dataclass
class GeneratedImage:
    path: Path
    subject: str
    reference: Path
    text_prompt: str


def find_generated(cfg: DreamBenchConfig, subjects: list[Subject]) -> list[GeneratedImage]:
    """Parse `<subject>+<reference id>+<anything>+<prompt>.<ext>` names under --generated."""
    by_name = {s.name: s for s in subjects}
    found, references_of = [], {}
    for path in list_images(cfg.generated, "--generated", recursive=True):
        parts = path.stem.split("+")
        if len(parts) != 4:
            raise ValueError(f"--generated: {path.name} is not named <subject>+<reference id>+<index>+<prompt>.png "
                             "(the names this command and the official script write).")
        subject, ref_id, _, prompt = parts
        if subject not in by_name:
            if cfg.subjects:
                continue  # restricted to other subjects
            raise ValueError(f"--generated: {path.name} is of subject {subject!r}, which --data has no folder for.")
        if subject not in references_of:
            references_of[subject] = {p.stem: p for p in list_images(Path(cfg.data) / subject,
                                                                     f"--data subject folder {subject!r}")}
        references = references_of[subject]
        if ref_id not in references:
            raise ValueError(f"--generated: {path.name} names reference {ref_id!r}, not found among "
                             f"{Path(cfg.data) / subject}/*{{{','.join(IMAGE_SUFFIXES)}}}.")
        chosen = by_name[subject]
        if cfg.max_references and references[ref_id] not in chosen.references:
            continue  # outside the --max-references subset (the folder may hold more)
        if cfg.max_prompts and prompt not in {template.format(chosen.noun) for template in chosen.prompts}:
            continue  # outside the --max-prompts subset
        found.append(GeneratedImage(path, subject, references[ref_id], prompt))
    if not found:
        raise ValueError(f"--generated {cfg.generated}: no images of the selected subjects.")
    return found


def _image_scores(gen: torch.Tensor, refs: dict[Path, torch.Tensor], items: list[GeneratedImage],
                  subject_refs: dict[str, list[Path]]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (paired [N], all-pairs [N]) cosines of generated features `gen` [N, D] with real features."""
    from .metrics import all_pairs_cosine, paired_cosine

    paired = paired_cosine(gen, torch.stack([refs[item.reference] for item in items]))
    all_pairs = torch.stack([
        all_pairs_cosine(gen[i:i + 1], torch.stack([refs[p] for p in subject_refs[item.subject]])).mean()
        for i, item in enumerate(items)])
    return paired, all_pairs


def score(cfg: DreamBenchConfig, subjects: list[Subject]) -> dict:
    from kosmosg_core.devices import resolve_device

    from .features import ClipFeatures, DinoFeatures

    unknown = sorted(set(cfg.metrics) - set(METRICS))
    if unknown or not cfg.metrics:
        raise ValueError(f"--metrics {cfg.metrics}: choose from {', '.join(METRICS)}.")
    device = resolve_device(cfg.device)
    items = find_generated(cfg, subjects)
    subject_refs = {s: list_images(Path(cfg.data) / s, f"--data subject folder {s!r}")
                    for s in sorted({item.subject for item in items})}
    ref_paths = [p for paths in subject_refs.values() for p in paths]
    generated_images = [item.path for item in items]  # read batch by batch by the feature extractors
    real_images = ref_paths
    per_image: dict[str, torch.Tensor] = {}
    if "dino" in cfg.metrics:
        dino = DinoFeatures(cfg.dino_model, device, cfg.dino_image_size, cfg.eval_batch_size)
        refs = dict(zip(ref_paths, dino(real_images)))
        per_image["dino"], per_image["dino_all_pairs"] = _image_scores(dino(generated_images), refs, items,
                                                                       subject_refs)
        del dino
    if "clip_i" in cfg.metrics or "clip_t" in cfg.metrics:
        clip = ClipFeatures(cfg.clip_model, device, cfg.eval_batch_size)
        gen = clip.images(generated_images)
        if "clip_i" in cfg.metrics:
            refs = dict(zip(ref_paths, clip.images(real_images)))
            per_image["clip_i"], per_image["clip_i_all_pairs"] = _image_scores(gen, refs, items, subject_refs)
        if "clip_t" in cfg.metrics:
            from .metrics import paired_cosine

            prompts = sorted({item.text_prompt for item in items})
            text = dict(zip(prompts, clip.texts(prompts)))
            per_image["clip_t"] = paired_cosine(gen, torch.stack([text[item.text_prompt] for item in items]))
    per_subject = {}
    for subject in subject_refs:
        mask = torch.tensor([item.subject == subject for item in items])
        per_subject[subject] = {"images": int(mask.sum()), **{k: float(v[mask].mean()) for k, v in per_image.items()}}
    return {"metrics": {k: float(v.mean()) for k, v in per_image.items()}, "num_images": len(items),
            "num_subjects": len(subject_refs), "per_subject": per_subject}


def run(cfg: DreamBenchConfig) -> dict:
    if not cfg.generated:
        raise ValueError("--generated is required: the folder the generated images are written to / read from.")
    subjects = load_subjects(cfg)
    written = 0
    if cfg.checkpoint:
        written = generate(cfg, build_jobs(subjects, cfg.drop_object))
    elif not Path(cfg.generated).is_dir():
        raise ValueError(f"--generated {cfg.generated}: no such folder; pass --checkpoint (and --sd-model) to "
                         "generate the images first.")
    result = score(cfg, subjects)
    result["generated_this_run"] = written
    result["models"] = {"dino": cfg.dino_model, "clip": cfg.clip_model}
    result["config"] = asdict(cfg)
    out = Path(cfg.output_json) if cfg.output_json else Path(cfg.generated) / "dreambench_metrics.json"
    write_json(out, result)
    return result


def main(argv=None) -> dict:
    return run(parse_eval_config(DreamBenchConfig, argv, "dreambench", __doc__))
