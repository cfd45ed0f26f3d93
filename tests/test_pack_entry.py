"""The pack's entry point (`__init__.py`) inside a ComfyUI too old for its node API, and outside ComfyUI."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _import_entry(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_comfyui(monkeypatch, *, latest_io=None, version="0.3.40"):
    """sys.modules as inside a ComfyUI: folder_paths loaded, its version module, and a comfy_api that
    has no `latest` (latest_io None) or a `latest` whose `io` is `latest_io`."""
    monkeypatch.setitem(sys.modules, "folder_paths", types.ModuleType("folder_paths"))
    monkeypatch.setitem(sys.modules, "comfyui_version", types.SimpleNamespace(__version__=version))
    comfy_api = types.ModuleType("comfy_api")  # a plain module: `comfy_api.latest` cannot be imported
    monkeypatch.setitem(sys.modules, "comfy_api", comfy_api)
    if latest_io is None:
        monkeypatch.delitem(sys.modules, "comfy_api.latest", raising=False)
    else:
        monkeypatch.setitem(sys.modules, "comfy_api.latest", types.SimpleNamespace(io=latest_io))


def test_comfyui_without_the_v3_api_fails_the_import_with_the_fix(monkeypatch):
    _fake_comfyui(monkeypatch, latest_io=None, version="0.3.40")
    with pytest.raises(ImportError) as error:
        _import_entry("kosmosg_pack_entry_no_api")
    message = str(error.value)
    assert "needs ComfyUI 0.30.0 or newer" in message and "this ComfyUI is 0.3.40" in message
    assert "comfy_api.latest cannot be imported" in message and "Update ComfyUI" in message


def test_comfyui_whose_node_api_lacks_autogrow_fails_the_import(monkeypatch):
    _fake_comfyui(monkeypatch, latest_io=types.SimpleNamespace(ComfyNode=object), version="0.29.1")
    with pytest.raises(ImportError, match=r"this ComfyUI is 0\.29\.1 and comfy_api\.latest\.io has no Autogrow"):
        _import_entry("kosmosg_pack_entry_no_autogrow")


def test_outside_comfyui_the_package_imports_without_nodes(monkeypatch):
    monkeypatch.delitem(sys.modules, "folder_paths", raising=False)
    monkeypatch.setitem(sys.modules, "comfy_api", types.ModuleType("comfy_api"))
    monkeypatch.delitem(sys.modules, "comfy_api.latest", raising=False)
    entry = _import_entry("kosmosg_pack_entry_outside")
    assert entry.__all__ == ["WEB_DIRECTORY"] and not hasattr(entry, "comfy_entrypoint")


def test_imported_as_a_lone_file_the_entry_point_loads_without_nodes(monkeypatch):
    """pytest imports the root __init__.py as a lone module when the checkout's folder is no Python name (the
    README's `ComfyUI-Kosmos-G`): every test then failed at collection with 'attempted relative import with
    no known parent package' (once a test had put ComfyUI's tree, hence its node API, on sys.path)."""
    monkeypatch.delitem(sys.modules, "folder_paths", raising=False)
    monkeypatch.setitem(sys.modules, "comfy_api", types.ModuleType("comfy_api"))
    monkeypatch.setitem(sys.modules, "comfy_api.latest", types.SimpleNamespace(io=types.SimpleNamespace(Autogrow=object)))
    spec = importlib.util.spec_from_file_location("__init__", REPO / "__init__.py")  # no package around it
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    assert entry.__all__ == ["WEB_DIRECTORY"] and not hasattr(entry, "comfy_entrypoint")


def test_required_version_is_the_one_pyproject_declares():
    entry_source = (REPO / "__init__.py").read_text()
    required = re.search(r'REQUIRED_COMFYUI = "([^"]+)"', entry_source).group(1)
    declared = re.search(r'requires-comfyui = ">=([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert required == declared


def test_pyproject_lists_the_requirements():
    """The Comfy registry reads pyproject.toml's static dependencies (a `dynamic` list from requirements.txt came
    out empty there); ComfyUI-Manager and pip read requirements.txt: the same requirements in both."""
    import ast

    # the list as TOML writes it is a Python literal too (tomllib is Python >= 3.11; the suite runs on 3.10 as well)
    declared = ast.literal_eval(re.search(r"^dependencies = (\[.*?\])$", (REPO / "pyproject.toml").read_text(),
                                          re.M | re.S).group(1))
    listed = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    assert declared == [line for line in listed if line]


REGISTRY_CHECK = ["-m", "ruff", "check", ".", "-q", "--no-cache", "--select", "S102,S307,E702", "--exit-zero"]


def test_the_registry_publishing_check_finds_nothing(tmp_path):
    """`comfy node validate` / `comfy node publish` run ruff over the whole repository for exec (S102), eval (S307)
    and two statements on one line (E702): warnings today, "an error soon". The same command here finds nothing,
    and finds each of them in a file that has them."""
    result = subprocess.run([sys.executable, *REGISTRY_CHECK], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr
    (tmp_path / "bad.py").write_text('exec("x = 1")\ny = eval("2"); z = 3\n')
    found = subprocess.run([sys.executable, *REGISTRY_CHECK], cwd=tmp_path, capture_output=True, text=True,
                           timeout=120).stdout
    assert all(code in found for code in ("S102", "S307", "E702")), found
