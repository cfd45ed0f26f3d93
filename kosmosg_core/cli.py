"""`python -m kosmosg_core` — encode, convert, info, generate, cache, bench.

Each sub-command maps onto one core function; a `KosmosGError` is printed as one line
(`error: ...`) with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .config import (CPU_KERNELS, DEFAULT_GUIDANCE_SCALE, DEFAULT_SCHEDULER, DEFAULT_STEPS, DISK_CACHE_MAX_BYTES,
                     DTYPE_ALIASES, DTYPE_NAMES, NOISE_MODES, SCHEDULERS)
from .errors import GenerationSettingsError, KosmosGError, PromptError

logger = logging.getLogger(__name__)

DTYPE_CHOICES = list(DTYPE_NAMES)


def _dtype_name(text: str) -> str:
    """A --dtype value: the name (float16) or a short one (fp16, bf16, fp32, half: as the nodes and bench say)."""
    return DTYPE_ALIASES.get(text.lower(), text.lower())
CPU_KERNEL_CHOICES = ["auto", *CPU_KERNELS]


class StoreOnce(argparse.Action):
    """argparse's plain store, but a flag given twice is refused by name: argparse would keep the last value without
    a word, and which one was meant is a guess. The flags given so far are kept in the namespace under
    `_flags_given` while parsing; `OneValuePerFlagParser` removes that key when it is done."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = vars(namespace).setdefault("_flags_given", {})
        if self.dest in given:
            parser.error(f"{option_string} is given twice on the command line ({given[self.dest]!r}, then {values!r}); "
                         "give it once.")
        given[self.dest] = values
        setattr(namespace, self.dest, values)


class OneValuePerFlagParser(argparse.ArgumentParser):
    """An ArgumentParser whose plain (one-value) flags are `StoreOnce`: given twice, they are refused by name.
    Sub-command parsers are of the same class (argparse makes them with the parent's class). Repeatable flags say
    so with action="append"; on / off switches (store_true) may repeat harmlessly."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("action", None, StoreOnce)
        self.register("action", "store", StoreOnce)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        vars(namespace).pop("_flags_given", None)
        return namespace, extras


def _cpu_linear_list(text: str) -> str:
    known = CPU_KERNEL_CHOICES + ["default", "packed"]  # packed: oneDNN's old name in the benchmark
    unknown = [k for k in text.split(",") if k not in known]
    if unknown or not text:
        raise argparse.ArgumentTypeError(f"unknown --cpu-linear {', '.join(unknown) or '(empty)'}: use "
                                         f"{', '.join(CPU_KERNEL_CHOICES)}, default or a comma list of them")
    return text


def _path(text: str) -> str:
    """A path argument with `~` expanded: the shell leaves it alone in `--out=~/x`. An empty one (an unset shell
    variable) is refused: Path("") is the current folder, which `cache --clear` would then clear."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give a file or folder")
    return os.path.expanduser(text)


def _image_paths(values: list[str]) -> list[Path]:
    return [Path(value) for value in values]  # (an empty one is refused by the parser: _path)


def _image_weights(args) -> list[float]:
    from .prompt import parse_image_weights

    return parse_image_weights(args.image_weights, len(args.image), "--image-weights", "in --image order")


def _size_gib(text: str) -> int:
    """--cache-max-gib: a number of GiB >= 0 -> bytes."""
    from .disk_cache import parse_size_gib

    try:
        return parse_size_gib(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _disk_cache(args):
    """--cache-dir / --cache-max-gib -> a DiskCache, or None."""
    if args.cache_dir is None:
        return None
    from .disk_cache import DiskCache
    from .files import check_output_folder

    # an existing folder is used as it is: one this user may only read still answers (its writes warn, as README
    # says; --cache-max-gib 0 writes nothing); a new one must be creatable
    folder = args.cache_dir if Path(args.cache_dir).is_dir() else check_output_folder(args.cache_dir, "--cache-dir")
    return DiskCache(folder, max_bytes=args.cache_max_bytes)


def cmd_encode(args) -> None:
    from .conditioning_file import ENCODE_TENSOR_NAME, check_encode_output
    from .files import save_safetensors, utf8_text
    from .pipeline import KosmosGPipeline, read_prompt_images
    from .prompt import clip_syntax_note, combine_image_weights

    out = check_encode_output(args.out, inputs=[args.checkpoint, *(args.image or [])])  # before loading
    cache = _disk_cache(args)
    images = _image_paths(args.image)
    if args.prompt == "" and args.image:
        raise PromptError(f"--prompt \"\" means the unconditional prompt, which takes no images, but {len(args.image)} "
                           "--image were given; add <i> placeholders to the prompt or drop the images.")
    weights = _image_weights(args)
    if args.prompt != "":
        images = read_prompt_images(args.prompt, images, weights)  # before loading too
        note = clip_syntax_note(args.prompt)
        if note:
            logger.warning("--prompt: %s", note)
    # lazy: the weights are read only if something is computed (not when --cache-dir holds the encoding)
    pipe = KosmosGPipeline.from_checkpoint(args.checkpoint, tokenizer_dir=args.tokenizer, dtype=args.dtype,
                                           device=args.device, cpu_kernel=args.cpu_kernel, lazy=True)
    if args.prompt == "":
        cond = pipe.encode_unconditional(disk_cache=cache)
    else:
        cond = pipe.encode(args.prompt, images, image_weights=weights, disk_cache=cache)
    # Stored as float32 whatever the compute dtype: exact for fp16/bf16 values, readable everywhere.
    save_safetensors({ENCODE_TENSOR_NAME: cond.float().cpu().contiguous()}, out,
                     metadata={"prompt": args.prompt,  # the images' names, as generate records them
                               "images": json.dumps([utf8_text(Path(image).name) for image in args.image or []]),
                               "image_weights": json.dumps(combine_image_weights(args.prompt, weights)),
                               "dtype": args.dtype,
                               "checkpoint": utf8_text(Path(args.checkpoint).name)})
    print(f"wrote {out}: cond {list(cond.shape)}")


def cmd_convert(args) -> None:
    from .checkpoint import convert_official
    from .files import check_output_file
    from .devices import resolve_dtype

    dtype = None if args.dtype == "keep" else resolve_dtype(args.dtype)
    # an existing file only with --overwrite, as the Convert node (a review saw an SD model replaced)
    out = check_output_file(args.out, "--out", inputs=(args.checkpoint,),
                            replace_fix=None if args.overwrite else "add --overwrite")
    out = convert_official(args.checkpoint, out, tokenizer_dir=args.tokenizer, dtype=dtype)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")


def cmd_info(args) -> None:
    from .checkpoint import describe

    print(json.dumps(describe(args.checkpoint), indent=2))


# generate's settings that a flag or --like's record gives; without either, generate_images' own defaults
GENERATE_SETTINGS = ("negative_prompt", "steps", "guidance_scale", "scheduler", "seed", "num_images", "noise", "dtype",
                     "device", "height", "width", "image_weights")


def generate_settings(args) -> dict:
    """generate's settings: each flag given, else the --like record's (`generate.settings_like`), else
    generate_images' defaults. With --like, the images given are checked against the record (warnings: the picture will
    differ, which may be what is wanted)."""
    from .generate import GENERATE_IMAGES_DEFAULTS, read_settings_record, settings_like

    defaults = {name: GENERATE_IMAGES_DEFAULTS[name] for name in GENERATE_SETTINGS}
    given = {name: getattr(args, name) for name in ("prompt", *GENERATE_SETTINGS) if name != "image_weights"}
    given["image_weights"] = _image_weights(args) if args.image_weights is not None else None
    record = read_settings_record(args.like) if args.like is not None else None
    settings = {**defaults, **(settings_like(record) if record else {}),
                **{name: value for name, value in given.items() if value is not None}}
    if settings.get("prompt") is None:
        raise PromptError("generate needs --prompt (or --like a PNG generate wrote, whose prompt it reuses).")
    if record is not None:
        other_images = args.prompt is not None or (args.image and len(args.image) != len(record["images"]))
        if other_images and given["image_weights"] is None:  # the record's weights are its images'
            settings["image_weights"] = None
        _check_like_settings(args, record, settings)
        _check_like_files(args, record, settings)
    return settings


def _check_like_settings(args, record: dict, settings: dict) -> None:
    """--like: a recorded device this machine lacks is an error saying so; official noise on another device or in
    another dtype than recorded (other numbers drawn) a warning."""
    from .errors import DeviceError
    from .generate import shown
    from .devices import resolve_device

    if args.device is None:
        try:
            resolve_device(settings["device"])
        except DeviceError as e:
            raise DeviceError(f"--like {args.like} was made on device {shown(repr(settings['device']))}, which cannot "
                              f"be used here ({shown(str(e), 200)}); give --device (e.g. --device cpu) to make it here, with other noise "
                              "numbers if its noise was 'official'.") from e
    if settings["noise"] == "official" and (_device_name(settings["device"]), settings["dtype"]) != \
            (_device_name(record["device"]), record["dtype"]):
        logger.warning("--like %s: its official noise was drawn on %s in %s; drawn on %s in %s it is other noise, so "
                       "other pictures.", args.like, shown(record["device"]), record["dtype"], shown(settings["device"]),
                       settings["dtype"])


def _device_name(device: str) -> str:
    """One name per device (`devices.canonical_device`: "CPU", "cpu:0" -> "cpu"), so spellings of one device compare
    equal; a name torch does not read stays as it is."""
    from .devices import canonical_device, resolve_device

    try:
        return str(canonical_device(resolve_device(device) if device.lower() == "auto" else device))
    except (RuntimeError, ValueError):
        return device


def _check_like_files(args, record: dict, settings: dict) -> None:
    """--like: the files given against the ones the record names (by name and, for its own prompt, the images by
    count and pixels)."""
    from .files import holds_content
    from .generate import image_digests, shown
    from .pipeline import read_prompt_images

    recorded = record["images"]
    for what, given, name, fingerprint in (
            ("--checkpoint", args.checkpoint, record.get("checkpoint"), record.get("checkpoint_fingerprint")),
            ("--sd-model", args.sd_model, record.get("sd_model"), record.get("sd_model_fingerprint")),
            ("--sd-config", args.sd_config, record.get("sd_config"), record.get("sd_config_fingerprint"))):
        if what == "--sd-config" and "sd_config" not in record:  # records before it: unknown, nothing to compare
            continue
        given_name = Path(given).name if given is not None else None
        if fingerprint is not None and given is not None:  # by content: a renamed copy is the same model
            if not holds_content(given, fingerprint):
                logger.warning("--like %s was made with another %s than %s (the record's was %s; the files' contents "
                               "differ): the picture will differ.", args.like, what, given_name, shown(name))
        elif given_name != name:  # records before fingerprints, or a model given on one side only: by name
            logger.warning("--like %s was made with %s %s, not %s: the picture will differ.", args.like, what,
                           shown(name), given_name or "(none)")
    if args.prompt is not None:  # another prompt: its own images, nothing to compare
        return
    names = shown(", ".join(str(name) for name in recorded), 200)
    if recorded and not args.image:
        raise PromptError(f"--like {args.like}: its prompt takes {len(recorded)} image(s) ({names}; the record keeps "
                          "file names only): give them again with --image, in that order.")
    if len(args.image) != len(recorded):
        logger.warning("--like %s: its prompt took %d image(s) (%s), %d are given: expect an error or another "
                       "picture.", args.like, len(recorded), names, len(args.image))
        return
    if recorded:
        pictures = read_prompt_images(settings["prompt"], _image_paths(args.image), settings["image_weights"])
        sizes = record.get("image_sizes") or [list(picture.size) for picture in pictures]  # records before sizes
        for k, (digest, expected) in enumerate(zip(image_digests(pictures), record["image_sha256"])):
            if digest != expected or list(pictures[k].size) != sizes[k]:
                logger.warning("--like %s: --image %s is not its image %d (%s): the pixels differ, so the picture "
                               "will too.", args.like, args.image[k], k + 1, shown(recorded[k]))


def cmd_generate(args) -> None:
    from .generate import generate_images

    settings = generate_settings(args)
    try:
        paths = generate_images(
            checkpoint=args.checkpoint, tokenizer_dir=args.tokenizer, sd_model=args.sd_model,
            images=_image_paths(args.image), out_dir=Path(args.out_dir), sd_config_dir=args.sd_config,
            record_settings=args.record_settings, **settings,
            disk_cache=_disk_cache(args),
            show_progress=sys.stderr.isatty())  # minutes per SD1.5 image on a CPU: show the steps (not in logs)
    except (GenerationSettingsError, PromptError) as error:
        if args.like is None:
            raise
        # a setting no flag gave came from the record: say so (e.g. steps the SD model's scheduler cannot run)
        raise type(error)(f"{error} (--like {args.like}: the settings not given as flags are its record's; give the "
                          "one named as a flag.)") from error
    for p in paths:
        print(f"wrote {p}")


def cmd_cache(args) -> None:
    from .disk_cache import DiskCache
    from .errors import OutputPathError

    folder = Path(args.dir)
    if not folder.is_dir() or not os.access(folder, os.R_OK | os.X_OK):
        problem = "does not exist" if not folder.exists() else "is not a folder" if not folder.is_dir() else \
            "cannot be read"
        raise OutputPathError(f"--dir {folder} {problem}; give the cache folder (ComfyUI's is user/__kosmosg_cache in "
                              "ComfyUI's folder, the CLI's the --cache-dir it was given).")
    cache = DiskCache(folder)
    entries = cache.entries()
    size = sum(entry_size for _, entry_size in entries)
    if args.clear:
        removed, removed_bytes, failures = cache.clear()
        reasons = ", ".join(sorted({e.strerror or str(e) for e in failures}))
        if failures and not removed:  # e.g. a read-only file system: nothing done, said as an error
            raise OutputPathError(f"--dir {folder}: none of its {len(failures)} entries could be removed ({reasons}); "
                                  "clear it where it can be written, or as the user who owns it.")
        print(f"removed {removed} entries ({removed_bytes / 2**20:.1f} MiB) from {folder}"
              + (f"; {len(failures)} could not be removed ({reasons})" if failures else ""))
    else:
        print(f"{folder}: {len(entries)} entries, {size / 2**20:.1f} MiB")


def cmd_bench(args) -> None:
    from .bench import run_benchmark

    run_benchmark(args)


def build_parser() -> argparse.ArgumentParser:
    parser = OneValuePerFlagParser(prog="python -m kosmosg_core", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO level)")
    # after the sub-command too (`encode ... -v`); SUPPRESS: not given there, it leaves the one before it alone
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="log progress (INFO level)")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[verbose], **kwargs)

    def model_args(p, tokenizer_help="folder with sentencepiece.bpe.model + dict.txt (default: inside the "
                                     "checkpoint, else beside it)"):
        p.add_argument("--checkpoint", required=True, type=_path, help="official checkpoint_final.pt or a converted .safetensors")
        p.add_argument("--tokenizer", default=None, type=_path, help=tokenizer_help)

    def cache_args(p):
        p.add_argument("--cache-dir", default=None, type=_path,
                       help="keep encodings and image features in this folder and reuse them in later runs (keyed by the "
                            "checkpoint file, dtype, device, prompt tokens, image pixels and weights; the ComfyUI "
                            "nodes use user/__kosmosg_cache); default: no disk cache")
        p.add_argument("--cache-max-gib", dest="cache_max_bytes", type=_size_gib, default=DISK_CACHE_MAX_BYTES, metavar="GIB",
                       help=f"size limit of --cache-dir in GiB, least recently used entries removed first "
                            f"(default {DISK_CACHE_MAX_BYTES / 2**30:g}; 0: read it, add nothing)")

    def image_args(p):
        p.add_argument("--image", action="append", type=_path, default=[], help="image file, once per <i> in order (repeatable)")
        p.add_argument("--image-weights", default=None, metavar="W1,W2,...",
                       help="one weight per --image, in order, e.g. '1.0, 0.8': multiplies that image's features in the "
                            "prompt (0..10; default 1.0 each, the official model), as the ComfyUI prompt node's weights; "
                            "a weight written in the prompt, <i:0.8>, multiplies with it")

    p = command("encode", help="prompt + images -> conditioning tensor `cond` [1,77,D] in a .safetensors")
    model_args(p)
    p.add_argument("--prompt", required=True, help='text with one <i> per image (<i:0.8>: that image at weight 0.8); "" = the unconditional prompt')
    image_args(p)
    p.add_argument("--out", required=True, type=_path, help="output .safetensors (tensor `cond`, float32)")
    cache_args(p)
    p.add_argument("--dtype", default="float32", type=_dtype_name, choices=DTYPE_CHOICES,
                   help="compute dtype (default float32; fp32 / fp16 / bf16 also read)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (this GPU if any; default cpu)")
    p.add_argument("--cpu-kernel", default="auto", choices=CPU_KERNEL_CHOICES,
                   help="on the CPU, the kernel of the layers that multiply the prompt's tokens (decoder, aligner "
                        "input): this package's few-row kernel, faster on short prompts (float32 with AVX2, bfloat16 "
                        "with AVX512-BF16; built once on first use: needs a C++ compiler and ninja), or oneDNN; "
                        "auto (default) = few-row where it builds, else oneDNN")
    p.set_defaults(func=cmd_encode)

    p = command("convert", help="official .pt -> one .safetensors (inference tensors, config + tokenizer inside); "
                                        "a converted .safetensors is accepted too, e.g. to re-cast it with --dtype")
    model_args(p, tokenizer_help="folder with the official sentencepiece.bpe.model + dict.txt to embed "
                                 "(default: the one inside a .safetensors, else beside the checkpoint)")
    p.add_argument("--out", required=True, type=_path, help="output .safetensors")
    p.add_argument("--dtype", default="keep", type=_dtype_name, choices=["keep"] + DTYPE_CHOICES,
                   help="tensor dtype in the output (default: keep the file's)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    p.set_defaults(func=cmd_convert)

    p = command("info", help="print a checkpoint's config, dtypes and size without building the model")
    p.add_argument("--checkpoint", required=True, type=_path, help=".pt or .safetensors")
    p.set_defaults(func=cmd_info)

    p = command("generate", help="generate PNGs with a local SD1.5 model conditioned by Kosmos-G")
    model_args(p)
    p.add_argument("--sd-model", default=None, type=_path,
                   help="SD1.5 single-file checkpoint (.safetensors/.ckpt), diffusers folder, or the built-in "
                        "models/nano/nano-sd15.safetensors; left out: the SD1.5 U-Net and VAE stored in an official "
                        "--checkpoint .pt (what the official demo samples with; `info` says whether it has them)")
    p.add_argument("--sd-config", default=None, type=_path,
                   help="for a single file, or the U-Net and VAE of an official .pt: a diffusers-layout folder with "
                        "model_index.json and unet/ vae/ scheduler/ configs (default: SD1.5's, shipped in "
                        "kosmosg_core/sd15_config)")
    p.add_argument("--like", default=None, type=_path, metavar="PNG",
                   help="a PNG written by generate: its recorded settings (prompt, negative prompt, image weights, "
                        "seed, steps, guidance, scheduler, noise, size, dtype, device) are the defaults of every flag "
                        "below, so it is made again bit for bit: with per-image noise that picture alone (its own seed "
                        "+ index), with official noise the whole run again; the files (--checkpoint, --sd-model, "
                        "--image) are given again (the record names them only), and any flag given overrides the "
                        "record (e.g. --seed)"),
    # settings left None here: the record of --like, else generate_images' defaults (GENERATE_SETTINGS)
    p.add_argument("--prompt", default=None, help="text with one <i> per image (<i:0.8>: that image at weight 0.8); "
                                                  "required unless --like")
    image_args(p)
    p.add_argument("--negative-prompt", default=None, help='negative text (default "" = the official unconditional <s>, or the --like record\'s)')
    p.add_argument("--out-dir", default="outputs", type=_path, help="folder for the PNGs (default: outputs)")
    p.add_argument("--steps", type=int, default=None, help=f"sampling steps (official demo: {DEFAULT_STEPS}, the default; or the --like record's)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help=f"classifier-free guidance, 1 or above: 1 = none (the negative prompt unused) (official demo: "
                        f"{DEFAULT_GUIDANCE_SCALE}, the default; or the --like record's)")
    p.add_argument("--scheduler", default=None, choices=list(SCHEDULERS),
                   help=f"official default: {DEFAULT_SCHEDULER} ({SCHEDULERS[DEFAULT_SCHEDULER]}; or the --like record's)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0, or the --like record's); with --noise per-image, image k uses seed "
                        "+ k")
    p.add_argument("--num-images", type=int, default=None, help="images per prompt (default 1, or the --like record's; the official demo makes 4)")
    p.add_argument("--noise", default=None, choices=NOISE_MODES,
                   help="starting noise: per-image (default: image k from --seed + k, drawn on the CPU, the same noise "
                        "on any device) or official (as the official demo: one draw of all images' noise from --seed on "
                        "--device in --dtype; with --device cuda --dtype float16 its noise); or the --like record's")
    for side in ("height", "width"):
        p.add_argument(f"--{side}", type=int, default=None,
                       help=f"image {side} in pixels, a multiple of 8 (default: the --like record's if it asked for "
                            "one, else the SD model's own, 512 for SD1.5 and 64 for the nano image model)")
    p.add_argument("--dtype", default=None, type=_dtype_name, choices=DTYPE_CHOICES,
                   help="default float32 (or the --like record's; fp32 / fp16 / bf16 also read)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N | auto (default cpu, or the --like record's)")
    cache_args(p)
    p.add_argument("--no-record", dest="record_settings", action="store_false",
                   help="write the PNGs without their record of the settings (prompt, image file names and pixel "
                        "hashes, seed, ...: the text chunk 'kosmosg'), e.g. before sharing them")
    p.set_defaults(func=cmd_generate)

    p = command("cache", help="a disk cache of encodings (--cache-dir, or ComfyUI's user/__kosmosg_cache): its "
                                     "size, or --clear to empty it")
    p.add_argument("--dir", required=True, type=_path, help="the cache folder")
    p.add_argument("--clear", action="store_true", help="remove every entry")
    p.set_defaults(func=cmd_cache)

    p = command("bench", help="measure load time, peak RSS and encode latency against machine yardsticks")
    p.add_argument("--size", default="official", choices=["official", "tiny", "small"],
                   help="model size with random weights (default: official)")
    p.add_argument("--dtypes", default="float32,bfloat16",
                   help="comma list of dtypes to time (default: float32,bfloat16; float16 on a GPU)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default: cpu)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per case, the median reported (default: 3)")
    p.add_argument("--cases", default="text-only,1-image,3-image",
                   help="comma list of prompt cases to time (default: text-only,1-image,3-image, every case)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores, at most 2 on CI)")
    p.add_argument("--cpu-linear", default="auto", type=_cpu_linear_list,
                   help="on the CPU, a comma list of: auto (default: what the pipeline runs here, few-row where "
                        "that kernel builds, else onednn), onednn (oneDNN-packed linear layers; float32, and bfloat16 "
                        "where the CPU has native bf16), few-row (the few-row kernel in the layers that multiply the "
                        "prompt's tokens, oneDNN in the others; the pipeline's default where it builds; bfloat16 "
                        "where the CPU has AVX512-BF16), default (torch's matmul everywhere); e.g. onednn,few-row "
                        "times both in one run")
    p.add_argument("--json", default=None, type=_path, help="also write the results to this JSON file")
    p.add_argument("--workdir", default=None, type=_path, help="where to write the benchmark's checkpoints, kept there (~14 GB at "
                   "--size official; default: a temporary folder, removed at the end)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    # KosmosGError: said in one line; OSError: the file system refused (permissions, a name too long, a full
    # disk). --verbose adds the traceback (with the error the one line summarises, e.g. diffusers' own).
    except (KosmosGError, OSError) as e:
        logging.getLogger(__name__).info("details", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line (outputs are written atomically: nothing half-written is left)
        logging.getLogger(__name__).info("details", exc_info=True)
        print("interrupted", file=sys.stderr)
        return 130
    return 0
