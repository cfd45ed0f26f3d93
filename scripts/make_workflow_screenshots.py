"""Screenshots of every shipped workflow (workflows/*.json) for the README: docs/screenshots/workflow-<name>.png,
and from each the template browser's thumbnail beside its workflow (workflows/<workflow name>.jpg).

Starts a real ComfyUI (the environment from .ci/setup_env.sh) on 127.0.0.1 with this pack, a throw-away
DATA folder, the example subject images and EMPTY files named like the models the workflows ask for
(so the model combos show those names and no missing-model warning appears; nothing is ever run),
then drives headless Chromium with tests/browser/workflow_screenshots.mjs and stops the server.
PNGs over --max-kb are re-encoded as 256-colour palette PNGs.

    ~/.cache/kosmosg/comfy/venv/bin/python scripts/make_workflow_screenshots.py [--out docs/screenshots]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from kosmosg_core.cli import OneValuePerFlagParser  # noqa: E402  (torch-free: a flag given twice is refused)
from support import comfy_server  # noqa: E402  (stdlib-only server helper shared with the tests)

PACK_FOLDER_NAME = "ComfyUI-Kosmos-G"
BROWSER_DIR = REPO / "tests" / "browser"
# which models folder each loader's file widget (its first widget) reads from
LOADER_FOLDERS = {
    "CheckpointLoaderSimple": "checkpoints",
    "KosmosGLoader": "kosmosg",
    "KosmosGCheckpointSD15": "kosmosg",
    "ControlNetLoader": "controlnet",
    "LoraLoaderModelOnly": "loras",
    "LoraLoader": "loras",
}

logger = logging.getLogger("make_workflow_screenshots")


def model_placeholders(workflows: list[Path]) -> set[tuple[str, str]]:
    """(models sub-folder, file name) for every loader in the workflows."""
    wanted = set()
    for workflow in workflows:
        for node in json.loads(workflow.read_text())["nodes"]:
            folder = LOADER_FOLDERS.get(node["type"])
            values = node.get("widgets_values") or []
            if folder and values and isinstance(values[0], str):
                wanted.add((folder, values[0]))
    return wanted


def prepare_data(data: Path, workflows: list[Path]) -> None:
    comfy_server.prepare_data_dir(data, REPO, PACK_FOLDER_NAME)
    for folder, name in sorted(model_placeholders(workflows)):
        target = data / "models" / folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()  # listed by ComfyUI, never loaded: the screenshots queue nothing
    for image in (REPO / "workflows" / "input").glob("*.png"):
        shutil.copyfile(image, data / "input" / image.name)


def shrink_png(path: Path, max_bytes: int) -> None:
    """Re-encode as an adaptive 256-colour palette PNG when the screenshot is over budget."""
    if path.stat().st_size <= max_bytes:
        return
    from PIL import Image

    with Image.open(path) as image:
        palette = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    palette.save(path, optimize=True)


THUMBNAIL_WIDTH = 512


def write_thumbnail(screenshot: Path, workflow: Path) -> Path:
    """The template browser shows `<workflow name>.jpg` from the workflow's folder (ComfyUI serves the folder at
    /api/workflow_templates/<pack>/): the screenshot, THUMBNAIL_WIDTH px wide, as JPEG."""
    from PIL import Image

    thumbnail = workflow.with_suffix(".jpg")
    with Image.open(screenshot) as image:
        image = image.convert("RGB")
        height = round(image.height * THUMBNAIL_WIDTH / image.width)
        image.resize((THUMBNAIL_WIDTH, height), Image.LANCZOS).save(thumbnail, "JPEG", quality=85, optimize=True)
    return thumbnail


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneValuePerFlagParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--max-kb", type=int, default=300, help="PNG size budget per screenshot (KiB)")
    parser.add_argument("--keep-data", action="store_true", help="keep the throw-away DATA folder (for its server.log)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the browser script's full report")
    parser.add_argument("workflows", nargs="*", type=Path, help="default: workflows/*.json")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not comfy_server.comfy_available():
        raise SystemExit(f"ComfyUI not installed at {comfy_server.COMFY_TREE}; run .ci/setup_env.sh")
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        raise SystemExit("playwright-core missing; run tests/browser/install.sh")
    workflows = [p.resolve() for p in args.workflows] or sorted((REPO / "workflows").glob("*.json"))
    data = Path(tempfile.mkdtemp(prefix="kosmosg-screenshots-"))
    prepare_data(data, workflows)
    server = comfy_server.ComfyServer(data, threads=1)
    logger.info("starting ComfyUI at %s (data: %s)", server.url, data)
    server.start()
    try:
        cmd = ["node", "workflow_screenshots.mjs", "--url", server.url, "--out", str(args.out.resolve()),
               "--width", str(args.width), "--height", str(args.height), *map(str, workflows)]
        result = subprocess.run(cmd, cwd=BROWSER_DIR, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise SystemExit(f"workflow_screenshots.mjs failed ({result.returncode}):\n{result.stderr[-4000:]}\n"
                             f"server log:\n{server.log_tail(40)}")
        report = json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        server.stop()
        if not args.keep_data:
            shutil.rmtree(data, ignore_errors=True)
    logger.debug("browser report: %s", json.dumps(report, indent=1))
    for entry in report["workflows"]:
        png = Path(entry["screenshot"])
        shrink_png(png, args.max_kb * 1024)
        write_thumbnail(png, next(w for w in workflows if w.name == entry["workflow"]))
        logger.info("%s: %d nodes, scale %.2f, %d KiB%s", png.name, entry["nodes"], entry["scale"],
                    png.stat().st_size // 1024, f", page errors: {entry['page_errors']}" if entry["page_errors"] else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
