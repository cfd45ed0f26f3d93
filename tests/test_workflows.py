"""The shipped workflows (workflows/*.json) are what tests/support/make_workflows.py writes, and their layout leaves
room between nodes. The browser check (tests/integration/test_browser.py, layout_check.mjs) measures the nodes as the
frontend draws them, in the classic canvas and in Vue nodes mode; this one reads the JSON alone, so it runs everywhere."""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
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



@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_the_readme_screenshot_shows_the_nodes_text(path):
    # scripts/make_workflow_screenshots.py fits each graph into 1400 x 800 (24 px margins); below a zoom where node text
    # would be smaller than 8 px (the frontend's "Zoom Node Level of Detail - font size threshold", on 14 px text) the
    # canvas draws the nodes without text or widgets
    boxes = [_box(node) for node in json.loads(path.read_text())["nodes"]]
    width = max(x + w for x, _, w, _ in boxes) - min(x for x, _, _, _ in boxes)
    height = max(y + h for _, y, _, h in boxes) - min(y for _, y, _, _ in boxes)
    scale = min((1400 - 2 * 24) / width, (800 - 2 * 24) / height)
    assert scale * 14 >= 8, (width, height, scale)


def test_every_earlier_version_of_a_workflow_is_known():
    """The start script updates a Workflows sidebar copy that equals an earlier shipped version (the user did not
    edit it): every version in the git history must be listed (make_workflows.py adds the one it replaces)."""
    if not (REPO / ".git").exists():
        pytest.skip("needs this repository's git history (a clone)")
    earlier = json.loads(make_workflows.EARLIER_VERSIONS.read_text())
    for path in SHIPPED:
        name = f"workflows/{path.name}"
        commits = subprocess.run(["git", "log", "--format=%H", "--", name], cwd=REPO, capture_output=True, text=True,
                                 check=True).stdout.split()
        versions = {hashlib.sha256(subprocess.run(["git", "show", f"{commit}:{name}"], cwd=REPO, capture_output=True,
                                                  check=True).stdout).hexdigest() for commit in commits}
        missing = versions - set(earlier.get(path.name, [])) - {hashlib.sha256(path.read_bytes()).hexdigest()}
        assert not missing, (f"{make_workflows.EARLIER_VERSIONS} lacks earlier versions of {path.name}: {sorted(missing)} "
                             "(python tests/support/make_workflows.py adds the version it replaces)")


def test_regenerating_remembers_the_replaced_version(tmp_path, monkeypatch):
    record = tmp_path / "earlier.json"
    record.write_text("{}")
    monkeypatch.setattr(make_workflows, "EARLIER_VERSIONS", record)
    workflow = tmp_path / "kosmosg-lora.json"
    workflow.write_text('{"an": "earlier version"}')
    make_workflows.remember_earlier_version(str(workflow), '{"the": "new one"}')
    make_workflows.remember_earlier_version(str(workflow), '{"an": "earlier version"}')  # unchanged: nothing to add
    assert json.loads(record.read_text()) == {"kosmosg-lora.json": [hashlib.sha256(workflow.read_bytes()).hexdigest()]}
