"""An environment for a subprocess in which one package is missing: a stand-in package earlier on the
path whose import fails as a package that is not installed does."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def env_without_package(tmp_path: Path, name: str) -> dict:
    """os.environ with OMP_NUM_THREADS=1 and a PYTHONPATH on which `import name` raises ModuleNotFoundError."""
    stand_in = tmp_path / "missing-packages" / name
    stand_in.mkdir(parents=True, exist_ok=True)
    (stand_in / "__init__.py").write_text(f"raise ModuleNotFoundError(\"No module named '{name}'\", name={name!r})\n")
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(stand_in.parent), str(REPO)]))
