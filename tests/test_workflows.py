"""The shipped workflows (workflows/*.json) are what tests/support/make_workflows.py writes, and their layout leaves
room between nodes. The browser check (tests/integration/test_browser.py, layout_check.mjs) measures the nodes as the
frontend draws them, in the classic canvas and in Vue nodes mode; this one reads the JSON alone, so it runs everywhere."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from support import make_workflows

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "workflows").glob("*.json"))


def test_every_shipped_workflow_is_the_generated_one():
    generated = make_workflows.all_workflows()
    assert sorted(generated) == [p.stem for p in SHIPPED], "run python tests/support/make_workflows.py"
    for path in SHIPPED:
        assert json.loads(path.read_text()) == generated[path.stem].to_json(), (
            f"{path.name} differs; run python tests/support/make_workflows.py")


def _box(node: dict) -> tuple[float, float, float, float]:
    """A node's box in graph units: its title bar above "pos", then its "size"."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - make_workflows.TITLE, w, h + make_workflows.TITLE


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_nodes_keep_their_distance(path):
    nodes = json.loads(path.read_text())["nodes"]
    for a, b in itertools.combinations(nodes, 2):
        (ax, ay, aw, ah), (bx, by, bw, bh) = _box(a), _box(b)
        gap = max(bx - (ax + aw), ax - (bx + bw), by - (ay + ah), ay - (by + bh))
        assert gap >= make_workflows.GAP, (a.get("title", a["type"]), b.get("title", b["type"]), gap)

