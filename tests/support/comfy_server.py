"""A real ComfyUI server for integration tests: start on a free loopback port, talk HTTP, stop.

Recipe: ../shared/comfyui/real-comfyui-for-tests.md. The ComfyUI tree and venv come from
.ci/setup_env.sh (default ~/.cache/kosmosg/comfy; override with KOSMOSG_COMFY_DIR). Everything
mutable (models, input, output, user, custom_nodes, sqlite DB) lives in a per-session DATA dir.
Standard library only (urllib), so it runs in any interpreter.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

CACHE_DIR = Path(os.environ.get("KOSMOSG_COMFY_DIR", Path.home() / ".cache" / "kosmosg" / "comfy"))
COMFY_TREE = CACHE_DIR / "ComfyUI"
VENV_PYTHON = CACHE_DIR / "venv" / "bin" / "python"
LOG_ROTATE_BYTES = 8 * 2**20  # a server.log larger than this at a start is moved to server.log.1
IMPORT_FAILURE_PATTERNS = [
    re.compile(r"\(IMPORT FAILED\): (.*)"),
    re.compile(r"Cannot import (.*) module for custom nodes"),
    re.compile(r"Error while calling comfy_entrypoint in (.*?):"),
    re.compile(r"Skip (.*) module for custom nodes due to the lack of NODE_CLASS_MAPPINGS"),
]


def comfy_available() -> bool:
    return (COMFY_TREE / "main.py").is_file() and VENV_PYTHON.is_file()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:port (else a second server would fail, or a check reach the wrong one). A port
    whose last connections are only closing (TIME_WAIT, for a minute after a server stopped) is free: ComfyUI binds
    with SO_REUSEADDR, and so does this check (on POSIX; on Windows the option would take a port in use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if os.name != "nt":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def prepare_data_dir(data: Path, pack_dir: Path, pack_name: str) -> Path:
    """DATA layout: models/*, input, output, temp, user settings, custom_nodes/<pack_name> -> the pack."""
    for sub in ("models/checkpoints", "models/loras", "models/controlnet", "models/kosmosg", "input", "output",
                "temp", "user/default", "custom_nodes"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    (data / "user" / "default" / "comfy.settings.json").write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    link = data / "custom_nodes" / pack_name
    if not link.exists():
        link.symlink_to(pack_dir.resolve(), target_is_directory=True)
    return data


class ComfyServer:
    def __init__(self, data: Path, port: int | None = None, threads: int = 1, extra_args: list[str] | None = None):
        self.data = Path(data)
        self.port = port or free_port()
        self.threads = threads
        self.extra_args = extra_args or []
        self.log_path = self.data / "server.log"
        self._log_start: int | None = None  # where this run's part of the log begins (None: not started)
        self.proc: subprocess.Popen | None = None
        self.client_id = str(uuid.uuid4())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> "ComfyServer":
        cmd = [str(VENV_PYTHON), "-u", "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.data), "--database-url", f"sqlite:///{self.data}/user/comfyui.db",
               "--disable-auto-launch", "--disable-api-nodes", "--preview-method", "none", *self.extra_args]
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads),
               "PYTHONUNBUFFERED": "1"}
        if not port_is_free(self.port):
            raise RuntimeError(f"port {self.port} on 127.0.0.1 is in use (another ComfyUI?); stop that server or "
                               "choose another port.")
        self._open_log()
        self.proc = subprocess.Popen(cmd, cwd=COMFY_TREE, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")
            try:
                if self.get("/system_stats", timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer /system_stats within {timeout:.0f} s:\n{self.log_tail()}")

    def _open_log(self) -> None:
        """The log is appended to (earlier runs stay readable); this run's checks read only what it adds. Past
        LOG_ROTATE_BYTES it becomes server.log.1 (the one before is dropped), so it never grows without limit."""
        if self.log_path.exists() and self.log_path.stat().st_size > LOG_ROTATE_BYTES:
            os.replace(self.log_path, self.log_path.with_name(self.log_path.name + ".1"))
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log = open(self.log_path, "ab")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
            except ProcessLookupError:
                pass
        self._log.close()
        self.proc = None

    def log_text(self) -> str:
        """This run's part of the server log ("" before `start`: an earlier run's lines are not this run's)."""
        if self._log_start is None or not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as log:
            log.seek(self._log_start)
            return log.read().decode(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def import_failures(self, pack_dir_names: list[str]) -> list[str]:
        """Log lines saying a custom node inside one of `pack_dir_names` failed to import."""
        failures = []
        for line in self.log_text().splitlines():
            for pattern in IMPORT_FAILURE_PATTERNS:
                match = pattern.search(line)
                if match and any(name in match.group(1) for name in pack_dir_names):
                    failures.append(line.strip())
        return failures

    # --- HTTP --------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict | None = None, timeout: float = 30.0):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get(self, path: str, timeout: float = 30.0):
        return self._request("GET", path, timeout=timeout)

    def get_json(self, path: str):
        status, raw = self.get(path)
        assert status == 200, f"GET {path} -> {status}: {raw[:500]!r}"
        return json.loads(raw)

    def object_info(self, node_id: str | None = None) -> dict:
        info = self.get_json("/object_info" + (f"/{node_id}" if node_id else ""))
        return info[node_id] if node_id else info

    def queue(self, prompt: dict) -> tuple[int, dict]:
        """POST /prompt -> (HTTP status, JSON body)."""
        status, raw = self._request("POST", "/prompt", {"prompt": prompt, "client_id": self.client_id})
        return status, json.loads(raw)

    def wait(self, prompt_id: str, timeout: float = 120.0) -> dict:
        """Poll /history until the prompt finished -> its history entry (status, outputs)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f} s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 120.0) -> dict:
        """Queue a prompt that must validate, wait for it -> history entry (success or error)."""
        status, body = self.queue(prompt)
        assert status == 200, f"prompt rejected ({status}): {json.dumps(body, indent=1)[:3000]}"
        return self.wait(body["prompt_id"], timeout)

    def output_images(self, entry: dict) -> list[bytes]:
        images = []
        for output in entry.get("outputs", {}).values():
            for image in output.get("images", []):
                query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
                status, raw = self.get(f"/view?{query}")
                assert status == 200, f"/view?{query} -> {status}"
                images.append(raw)
        return images


def execution_error(entry: dict) -> dict | None:
    """The `execution_error` message of a failed run (node_type, exception_message, ...), or None."""
    for kind, payload in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return payload
    return None
