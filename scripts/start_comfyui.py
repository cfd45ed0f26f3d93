"""Start ComfyUI with the Kosmos-G pack, its small default models and the example workflows ready.

Run through scripts/start_comfyui.sh, which first creates (or reuses) the environment under
~/.cache/kosmosg with .ci/setup_env.sh and then runs this file with that environment's Python.

What it does (nothing outside DATA and the pack is touched; no other ComfyUI install is changed):
  DATA (default ~/.cache/kosmosg/comfyui-data, or --dir):
    custom_nodes/ComfyUI-Kosmos-G -> this repository (symlink)
    kosmosg-pack-models/          links: checkpoints/nano-sd15.safetensors, kosmosg/kosmosg-nano.safetensors
    kosmosg_model_paths.yaml      registers kosmosg-pack-models for `checkpoints` and `kosmosg` (its own name:
                                  a ComfyUI tree given as DATA keeps its extra_model_paths.yaml)
    input/                        the example subject images from workflows/input/
    user/default/workflows/       the shipped workflows (Workflows sidebar); updated unless edited there
    models/, output/, user/       ComfyUI's usual folders
  If a trained nano model is missing from models/nano (a checkout without the weights), a tiny
  RANDOM stand-in with the same file name is generated once into ~/.cache/kosmosg/standin-models-v1
  and registered instead
  (the graph runs end to end; the images are noise).

Modes:
  (default)  start the server on 127.0.0.1:PORT in the foreground, print the URL and the
             workflow to open; Ctrl-C stops it.
  --smoke    start it, queue the out-of-the-box workflow through the HTTP API, check the image is
             a valid PNG of the workflow's size and not one flat colour, stop the server; exit status 0 (ok)
             or 1.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from kosmosg_core.cli import OneValuePerFlagParser  # noqa: E402  (torch-free: runs before the venv exists, for --help)
PACK_FOLDER_NAME = "ComfyUI-Kosmos-G"
NANO_DIR = Path(os.environ.get("KOSMOSG_NANO_DIR") or REPO / "models" / "nano")  # env: another nano models folder
NANO_SD15 = "nano-sd15.safetensors"
NANO_KOSMOSG = "kosmosg-nano.safetensors"
OUT_OF_THE_BOX = "kosmosg-nano-out-of-the-box"
# the SHA-256 of every earlier version of each shipped workflow (tests/support/make_workflows.py adds the one it
# replaces; tests/test_workflows.py checks it against the git history): a copy in the Workflows sidebar equal to
# one of them is the pack's, not edited, so it is updated
EARLIER_VERSIONS = REPO / "scripts" / "earlier_workflow_versions.json"
EXAMPLE_IMAGES_DIR = REPO / "workflows" / "input"
NODE_IDS = ("KosmosGLoader", "KosmosGInterleavedPrompt", "KosmosGEncode", "KosmosGSaveConditioning",
            "KosmosGLoadConditioning", "KosmosGConvertCheckpoint", "KosmosGOfficialSampler",
            "KosmosGOfficialNoise", "KosmosGCheckpointSD15")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LOCK_NAME = ".start_comfyui.lock"  # in DATA: held while a server of this script runs on it
PACK_MODELS = "kosmosg-pack-models"  # DATA's folder of links to the models the yaml registers
STANDIN_VERSION = "1"  # bump when the stand-in generators change

logger = logging.getLogger("start_comfyui")


def default_comfy_dir() -> Path:
    """The ComfyUI tree beside the venv that runs this script (.ci/setup_env.sh's layout)."""
    env = os.environ.get("KOSMOSG_COMFY_DIR")
    if env:
        return Path(env) / "ComfyUI"
    return Path(sys.prefix).parent / "ComfyUI"


def _port(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port: use 1-65535")
    return port


def _positive(kind):
    """An argparse type: a number of `kind` above 0 (a thread count of -3 reached torch as OMP_NUM_THREADS=-3)."""
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} is not above 0")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneValuePerFlagParser(prog="bash scripts/start_comfyui.sh", description=__doc__.splitlines()[0],
                                   epilog="Arguments after `--` go to ComfyUI's main.py unchanged.")
    parser.add_argument("--dir", type=Path, default=Path.home() / ".cache" / "kosmosg" / "comfyui-data",
                        help="user data folder: models, input, output, settings (default: %(default)s)")
    parser.add_argument("--port", type=_port, default=None,
                        help="port on 127.0.0.1, 1-65535 (default 8188; --smoke picks a free one)")
    parser.add_argument("--smoke", action="store_true",
                        help="start, run the out-of-the-box workflow through the API, check the image, stop")
    parser.add_argument("--comfy", type=Path, default=None, help="ComfyUI tree (default: beside the venv)")
    parser.add_argument("--threads", type=_positive(int), default=None,
                        help="torch CPU threads for the server (default: torch's choice; --smoke uses 1)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is available")
    parser.add_argument("--timeout", type=_positive(float), default=300.0,
                        help="--smoke: seconds allowed for start + run")
    argv = list(sys.argv[1:] if argv is None else argv)
    own, comfy_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = parser.parse_args(own)
    if any(a == "--port" or a.startswith("--port=") for a in comfy_args):
        parser.error("give --port before `--` (this script starts the server on its own --port and checks it there)")
    if args.dir.exists() and not args.dir.is_dir():
        parser.error(f"--dir {args.dir} is a file; give a folder (it is created if missing)")
    problem = database_path_problem(args.dir.expanduser().resolve())
    if problem:
        parser.error(f"--dir {args.dir}: {problem}; give a folder whose path has neither")
    args.comfy_args = comfy_args
    args.comfy = (args.comfy or default_comfy_dir()).resolve()
    args.dir = args.dir.expanduser().resolve()
    return args


# --- the data folder -------------------------------------------------------------------------------
def database_path_problem(data: Path) -> str | None:
    """ComfyUI keeps its database at DATA/user/comfyui.db, named by an sqlite:/// URL: a `?` in the path starts
    the URL's query (the database would be made elsewhere), and any `%` stops alembic's config (its interpolation
    syntax): ComfyUI then runs without its database."""
    text = str(data)
    if "?" in text or "%" in text:
        return "ComfyUI's database URL cannot hold a '?' or a '%'"
    return None


def lock_data_dir(data: Path):
    """Hold DATA/.start_comfyui.lock while this script runs: two servers on one data folder would share its
    database, outputs and temp files. Released when the process ends, however it ends."""
    from filelock import FileLock, Timeout  # ComfyUI's own dependency (its database lock)

    lock = FileLock(str(data / LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise SystemExit(f"[start_comfyui] --dir {data} is in use by another start_comfyui (a server is running on "
                         "it); stop that one, or give this one another --dir") from None
    return lock


def prepare_data_dir(data: Path) -> None:
    for sub in ("models/checkpoints", "models/kosmosg", "models/loras", "models/controlnet", "input", "output",
                "temp", "custom_nodes", "user/default/workflows"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    settings = data / "user" / "default" / "comfy.settings.json"
    if not settings.exists():  # first start only: skip the tour; later the user's own settings rule
        settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}, indent=2))
    link = data / "custom_nodes" / PACK_FOLDER_NAME
    if link.is_symlink() and link.resolve() != REPO:
        link.unlink()  # an older clone elsewhere: point at this one
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    elif not link.is_symlink():
        raise SystemExit(f"{link} exists and is not a link to this pack; remove it or use another --dir")


def copy_examples(data: Path) -> list[str]:
    """Example subject images -> input/ (refreshed); workflows -> the Workflows sidebar: copied when missing, updated
    when the copy there is an earlier version of the pack's (EARLIER_VERSIONS), kept when the user edited it."""
    copied = []
    for image in sorted(EXAMPLE_IMAGES_DIR.glob("*.png")):
        shutil.copyfile(image, data / "input" / image.name)
        copied.append(image.name)
    earlier = json.loads(EARLIER_VERSIONS.read_text())
    for workflow in sorted((REPO / "workflows").glob("*.json")):
        target = data / "user" / "default" / "workflows" / workflow.name
        there = _sha256(target) if target.exists() else None
        if there == _sha256(workflow):
            continue
        if there is not None and there not in earlier.get(workflow.name, []) and _is_json(target):
            logger.info("keeping %s: it is not the pack's (edited there); delete it to get the pack's", target)
            continue
        if there is not None and there not in earlier.get(workflow.name, []):  # a copy cut short: not an edit
            logger.info("replacing %s: it is not readable JSON (a copy cut short?)", target)
        partial = target.with_name(target.name + ".partial")  # not a .json: the sidebar never lists it
        shutil.copyfile(workflow, partial)
        os.replace(partial, target)  # a kill mid-copy leaves the old file or the new one, never half of one
    return copied


def _is_json(path: Path) -> bool:
    try:
        json.loads(path.read_bytes())
    except ValueError:  # not JSON, or not UTF-8
        return False
    return True


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def link_pack_models(data: Path, standins: Path | None) -> Path:
    """DATA/kosmosg-pack-models/{checkpoints,kosmosg}/: one link per model, to models/nano's file or
    its stand-in. Registering models/nano itself for both loaders made each list both files (Load
    Checkpoint offered kosmosg-nano.safetensors: "Could not detect model type"). -> the folder."""
    root = data / PACK_MODELS
    for folder, name in (("checkpoints", NANO_SD15), ("kosmosg", NANO_KOSMOSG)):
        source = NANO_DIR / name if (NANO_DIR / name).is_file() else standins / folder / name
        link = root / folder / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            link.unlink()  # refreshed every start: the real file replaces a stand-in once it exists
        elif link.exists():
            raise SystemExit(f"{link} is not a link made by this script; move it to {data / 'models' / folder}")
        link.symlink_to(source)
    return root


YAML_MARKER = "# written by scripts/start_comfyui.py; regenerated on every start"


def write_extra_model_paths(data: Path, pack_models: Path) -> Path:
    """Registers the pack's models (link_pack_models) for CheckpointLoaderSimple and the Kosmos-G
    loader; only this server reads the file (--extra-model-paths-config)."""
    lines = [YAML_MARKER,
             "kosmosg_pack_models:  # links to the pack's models/nano (or random-weight stand-ins)",
             f"  base_path: {json.dumps(str(pack_models))}",
             "  checkpoints: checkpoints",
             "  kosmosg: kosmosg"]
    # earlier versions wrote DATA/extra_model_paths.yaml: removed when it is ours (a ComfyUI tree given as DATA had
    # its own overwritten: a review found it); a file of that name of anyone else's is never touched
    earlier = data / "extra_model_paths.yaml"
    if earlier.is_file() and earlier.read_text(errors="replace").startswith(YAML_MARKER):
        earlier.unlink()
    path = data / "kosmosg_model_paths.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


# --- stand-in models (when the nano models are missing) ---------------------------------------
def missing_nano_models() -> list[str]:
    return [name for name in (NANO_SD15, NANO_KOSMOSG) if not (NANO_DIR / name).is_file()]


def standin_dir() -> Path:
    """Shared by every data folder (generated once): ~/.cache/kosmosg/standin-models-v<N>."""
    cache = Path(os.environ.get("KOSMOSG_CACHE", Path.home() / ".cache" / "kosmosg"))
    return cache / f"standin-models-v{STANDIN_VERSION}"


def ensure_standins(comfy: Path, missing: list[str]) -> Path:
    """Tiny random models under the nano names: an SD1.5-format U-Net + TAESD checkpoint (built with
    ComfyUI's own classes) and a Kosmos-G pack checkpoint with a tiny tokenizer inside."""
    out = standin_dir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    sd15 = out / "checkpoints" / NANO_SD15
    if NANO_SD15 in missing and not _standin_current(sd15):
        logger.info("generating the stand-in %s (random weights, ~10 s)", NANO_SD15)
        scratch = out / f"tmp-sd15-{os.getpid()}"  # concurrent starts never share scratch files
        subprocess.run([sys.executable, str(REPO / "tests" / "support" / "comfy_tiny_models.py"),
                        "--comfy", str(comfy), "--out", str(scratch)], check=True, env=env, stdout=subprocess.DEVNULL)
        sd15.parent.mkdir(parents=True, exist_ok=True)
        os.replace(scratch / "checkpoints" / "tiny-sd15.safetensors", sd15)
        shutil.rmtree(scratch)
        _mark_standin(sd15)
    kosmosg = out / "kosmosg" / NANO_KOSMOSG
    if NANO_KOSMOSG in missing and not _standin_current(kosmosg):
        logger.info("generating the stand-in %s (random weights, tiny tokenizer)", NANO_KOSMOSG)
        code = ("import sys, torch; torch.set_num_threads(1)\n"
                "from pathlib import Path\n"
                "from support.tiny_kosmosg import write_tiny_pack\n"
                "d = Path(sys.argv[1]); d.mkdir(parents=True, exist_ok=True)\n"
                "write_tiny_pack(d / sys.argv[3], context_dim=768, seed=0, name=sys.argv[2])\n")
        build = f"build-{os.getpid()}"
        subprocess.run([sys.executable, "-c", code, str(out / "kosmosg"), NANO_KOSMOSG, build], check=True, env=env,
                       cwd=REPO)
        os.replace(out / "kosmosg" / build / NANO_KOSMOSG, kosmosg)  # tokenizer is inside the file
        shutil.rmtree(out / "kosmosg" / build)
        _mark_standin(kosmosg)
    (out / "README.txt").write_text(
        "Random-weight STAND-IN models generated by scripts/start_comfyui.py because the pack's\n"
        f"models/nano/ does not contain {', '.join(missing)} yet. They make the out-of-the-box workflow\n"
        "run end to end, but the images are noise. Delete this folder any time.\n")
    return out


def _standin_current(path: Path) -> bool:
    stamp = path.with_name(path.name + ".standin")
    return path.is_file() and stamp.is_file() and stamp.read_text().strip() == STANDIN_VERSION


def _mark_standin(path: Path) -> None:
    path.with_name(path.name + ".standin").write_text(STANDIN_VERSION + "\n")


# --- the server -----------------------------------------------------------------------------------
def server_command(args, data: Path, yaml_path: Path, port: int, cpu: bool) -> list[str]:
    cmd = [sys.executable, "-u", "main.py", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(data), "--database-url", f"sqlite:///{data}/user/comfyui.db",
           "--extra-model-paths-config", str(yaml_path), "--disable-auto-launch", "--disable-api-nodes"]
    if cpu:
        cmd.append("--cpu")
    if args.smoke:
        cmd += ["--preview-method", "none"]
    return cmd + list(args.comfy_args)


def gpu_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # a broken CUDA install must not stop a CPU start
        return False


def server_env(threads: int | None) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def banner(url: str, data: Path, standins: Path | None, examples: list[str]) -> str:
    lines = ["", "=" * 78, f"  ComfyUI with Kosmos-G is running:  {url}",
             f"  Open the workflow '{OUT_OF_THE_BOX}' (left sidebar > Workflows,",
             f"  or the logo menu > Browse Templates > {PACK_FOLDER_NAME}), then press Run.",
             f"  Example subject images in input/: {', '.join(examples) or '(none)'}",
             f"  Data folder: {data}"]
    if standins is not None:
        lines += [f"  NOTE: {', '.join(missing_nano_models())} are RANDOM-WEIGHT STAND-INS from",
                  f"        {standins} (the trained nano files are missing from models/nano): the graph runs,",
                  "        the images are noise. Put real SD1.5 / Kosmos-G checkpoints in",
                  f"        {data / 'models' / 'checkpoints'} and {data / 'models' / 'kosmosg'} for real images."]
    lines += ["  Stop with Ctrl-C.", "=" * 78, ""]
    return "\n".join(lines)


def run_foreground(args, cmd: list[str], url: str, comfy: Path, text: str) -> int:
    proc = subprocess.Popen(cmd, cwd=comfy, env=server_env(args.threads))
    try:
        if wait_ready(proc, url, timeout=600):
            print(text, flush=True)
        return proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the server too (same process group): let it finish
        return proc.wait()
    finally:  # SIGTERM to this script, or any error: never leave the server running
        for stop, grace in ((proc.send_signal, 10), (lambda _: proc.terminate(), 5), (lambda _: proc.kill(), 5)):
            if proc.poll() is not None:
                break
            stop(signal.SIGINT)  # SIGINT first (ComfyUI's clean stop); ignored by background jobs
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                continue


def wait_ready(proc, url: str, timeout: float) -> bool:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url + "/system_stats", timeout=2) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.25)
    return False


# --- --smoke ----------------------------------------------------------------------------------------
def smoke(args, data: Path, yaml_path: Path, comfy: Path, standins: Path | None) -> int:
    """Start, run the out-of-the-box workflow via /prompt, check the PNG, stop. -> exit status."""
    os.environ["KOSMOSG_COMFY_DIR"] = str(comfy.parent)
    from support.comfy_server import ComfyServer, execution_error  # noqa: E402  (the tests' HTTP harness)
    from support.workflow_api import ui_to_api  # noqa: E402

    extra = ["--extra-model-paths-config", str(yaml_path)] + list(args.comfy_args)
    server = ComfyServer(data, port=args.port, threads=args.threads or 1, extra_args=extra)
    if gpu_available() and not args.cpu:
        logger.info("a GPU is available, but --smoke always runs on the CPU (what CI checks)")
    started = time.monotonic()
    print(f"[smoke] starting ComfyUI on {server.url} (log: {server.log_path})", flush=True)
    try:
        server.start(timeout=args.timeout)
        print(f"[smoke] server ready after {time.monotonic() - started:.1f} s", flush=True)
        failures = server.import_failures([PACK_FOLDER_NAME, REPO.name])
        if failures:
            return _fail(server, "the pack failed to import:\n  " + "\n  ".join(failures))
        info = server.object_info()
        missing = [n for n in NODE_IDS if n not in info]
        if missing:
            return _fail(server, f"nodes missing from /object_info: {missing}")
        problem = loader_list_problem(info)
        if problem:
            return _fail(server, problem)
        workflow = json.loads((REPO / "workflows" / f"{OUT_OF_THE_BOX}.json").read_text())
        prompt = ui_to_api(workflow, info)
        status, body = server.queue(prompt)
        if status != 200:
            return _fail(server, f"the workflow was rejected ({status}): {json.dumps(body)[:2000]}")
        entry = server.wait(body["prompt_id"], timeout=max(30.0, args.timeout - (time.monotonic() - started)))
        if entry["status"]["status_str"] != "success":
            return _fail(server, f"the workflow failed: {json.dumps(execution_error(entry))[:2000]}")
        images = server.output_images(entry)
        if len(images) != 1:
            return _fail(server, f"expected 1 output image, got {len(images)}")
        size = _expected_size(prompt)
        problem = png_problem(images[0], size)
        if problem:
            return _fail(server, problem)
        saved = sorted((data / "output").glob("kosmosg*.png"), key=lambda p: p.stat().st_mtime)
        where = saved[-1] if saved else "(output/)"
        print(f"[smoke] OK: {OUT_OF_THE_BOX} produced a valid {size[0]}x{size[1]} PNG ({len(images[0])} bytes) "
              f"at {where} in {time.monotonic() - started:.1f} s", flush=True)
        if standins is not None:
            print(f"[smoke] models used: RANDOM-WEIGHT STAND-INS for {', '.join(missing_nano_models())} "
                  f"(from {standins}); the trained nano files are missing from models/nano", flush=True)
        return 0
    except (RuntimeError, TimeoutError, OSError, AssertionError, KeyError, ValueError) as e:
        return _fail(server, f"{type(e).__name__}: {e}")
    except KeyboardInterrupt:  # Ctrl-C: one line, the server stopped below
        print("[smoke] interrupted (Ctrl-C); the server is stopped", file=sys.stderr, flush=True)
        return 130
    finally:
        server.stop()


def combo_options(info: dict, node: str, name: str) -> list[str]:
    """A combo input's choices from /object_info: [choices, {...}] or ["COMBO", {"options": choices}]."""
    spec = info[node]["input"]["required"][name]
    return list(spec[0]) if isinstance(spec[0], list) else list(spec[1].get("options", []))


def loader_list_problem(info: dict) -> str | None:
    """Each loader lists its own nano model and not the other one (kosmosg_model_paths.yaml's job)."""
    for node, name, own, other in (("CheckpointLoaderSimple", "ckpt_name", NANO_SD15, NANO_KOSMOSG),
                                   ("KosmosGLoader", "checkpoint", NANO_KOSMOSG, NANO_SD15)):
        options = combo_options(info, node, name)
        if own not in options or other in options:
            return f"{node} lists {options}: expected {own} and not {other} (kosmosg_model_paths.yaml)"
    return None


def _expected_size(prompt: dict) -> tuple[int, int]:
    latent = next(n for n in prompt.values() if n["class_type"] == "EmptyLatentImage")["inputs"]
    return int(latent["width"]), int(latent["height"])


def png_problem(data: bytes, size: tuple[int, int]) -> str | None:
    """None for a decodable PNG of `size` that is not one flat colour (NaN latents decode black; a model that
    ignores its input gives a flat picture); else what is wrong."""
    from PIL import Image

    if not data.startswith(PNG_SIGNATURE):
        return f"the output is not a PNG (starts with {data[:8]!r})"
    try:
        Image.open(io.BytesIO(data)).verify()  # checksums and structure
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:  # PIL raises many types for corrupt files
        return f"the output PNG does not decode: {e}"
    if image.size != size:
        return f"the output is {image.size[0]}x{image.size[1]}, the workflow asks for {size[0]}x{size[1]}"
    extrema = image.getextrema()  # (min, max) per band, or one pair for a one-band image
    if all(low == high for low, high in (extrema if isinstance(extrema[0], tuple) else [extrema])):
        return f"the output is one flat colour ({image.getpixel((0, 0))}): the models produced no picture"
    return None


def _fail(server, message: str) -> int:
    tail = server.log_tail(40)  # empty before the server started: no earlier run's lines
    log = "" if tail in message else f"\n--- server log (tail) ---\n{tail}"  # start-up errors carry it already
    print(f"[smoke] FAILED: {message}{log}", file=sys.stderr, flush=True)
    return 1


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="[start_comfyui] %(message)s")
    sys.path.insert(0, str(REPO / "tests"))  # support.comfy_server: the tests' server harness, shared
    args = parse_args(argv)
    if not (args.comfy / "main.py").is_file():
        raise SystemExit(f"no ComfyUI tree at {args.comfy}; run scripts/start_comfyui.sh (it installs one) "
                         "or pass --comfy")
    port = args.port or 8188
    from support.comfy_server import port_is_free

    if (not args.smoke or args.port) and not port_is_free(port):  # before anything is set up or written
        raise SystemExit(f"[start_comfyui] port {port} on 127.0.0.1 is in use (ComfyUI already running? its URL is "
                         f"http://127.0.0.1:{port}); stop it, or start this one with --port N")
    data = args.dir
    try:
        data.mkdir(parents=True, exist_ok=True)
        args.data_lock = lock_data_dir(data)  # held until the process ends; taken before anything in DATA changes
        prepare_data_dir(data)
    except OSError as e:  # a read-only place, a path no file system holds (/proc/...)
        raise SystemExit(f"[start_comfyui] cannot set up --dir {data} ({e.strerror or e}: {e.filename or data}); give "
                         "a folder you can write to") from e
    examples = copy_examples(data)
    missing = missing_nano_models()
    standins = ensure_standins(args.comfy, missing) if missing else None
    yaml_path = write_extra_model_paths(data, link_pack_models(data, standins))
    if args.smoke:
        return smoke(args, data, yaml_path, args.comfy, standins)
    cpu = args.cpu or not gpu_available()
    cmd = server_command(args, data, yaml_path, port, cpu)
    url = f"http://127.0.0.1:{port}"
    logger.info("starting: %s", " ".join(cmd))
    return run_foreground(args, cmd, url, args.comfy, banner(url, data, standins, examples))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
