"""The pack in the real ComfyUI frontend (1.47.12, shipped with ComfyUI 0.30.0) in headless Chromium.

tests/browser/ui_check.mjs drives the page once (playwright-core + Debian's chromium, installed by
tests/browser/install.sh) and reports what it saw as JSON; the tests below assert on that report.
tests/browser/vue_check.mjs does the same in the frontend's Vue nodes mode (setting Comfy.VueNodes.Enabled,
"Nodes 2.0"), switched on for its own page and back off after it. tests/browser/layout_check.mjs loads every
shipped workflow in both modes and measures where each node lands on screen.
Screenshots go to $KOSMOSG_SCREENSHOT_DIR when set, else to the test's temporary folder.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from support import comfy_tiny_models

from .conftest import TINY_KOSMOSG_PT

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
BROWSER_DIR = REPO / "tests" / "browser"
WORKFLOW = REPO / "workflows" / "kosmosg-two-subjects.json"
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
CHROMIUM_PATHS = ["/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser"]
NODE_IDS = ["KosmosGCheckpointSD15", "KosmosGConvertCheckpoint", "KosmosGEncode", "KosmosGInterleavedPrompt",
            "KosmosGLoadConditioning", "KosmosGLoader", "KosmosGOfficialNoise", "KosmosGOfficialSampler",
            "KosmosGSaveConditioning"]
# the shipped workflow names real models; the session server has tiny ones (tests/integration/conftest.py)
SUBSTITUTIONS = {"ckpt_name": comfy_tiny_models.UNET_NAME, "checkpoint": TINY_KOSMOSG_PT, "steps": 2,
                 "width": 64, "height": 64}


def _browser_missing() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed"
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is not installed in tests/browser (run tests/browser/install.sh)"
    if not any(os.path.exists(p) for p in CHROMIUM_PATHS):
        return "chromium is not installed (run tests/browser/install.sh)"
    return None


def run_browser_script(script: str, comfy, shots: Path, *args: str, timeout: int) -> dict:
    """tests/browser/SCRIPT against the server -> the JSON report it prints last (+ "screenshot_dir": `shots`).
    Without Chromium / playwright-core: skipped, and failed under CI (which installs them)."""
    missing = _browser_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    cmd = ["node", script, "--url", comfy.url, "--screenshots", str(shots), "--timeout", "150", *args]
    result = subprocess.run(cmd, cwd=BROWSER_DIR, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (f"{script} failed ({result.returncode}):\n{result.stderr[-4000:]}\n"
                                    f"server log:\n{comfy.log_tail(40)}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    report["screenshot_dir"] = shots
    return report


@pytest.fixture(scope="module")
def browser_report(comfy, tmp_path_factory):
    shots = Path(os.environ.get("KOSMOSG_SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots"))
    return run_browser_script("ui_check.mjs", comfy, shots, "--workflow", str(WORKFLOW),
                              "--substitute", json.dumps(SUBSTITUTIONS), timeout=420)


def _sockets(state) -> list[str]:
    return [i["name"] for i in state["inputs"] if i["name"].startswith("images.")]


def _page_errors(report) -> list[str]:
    """The page's uncaught errors, less one of frontend 1.58.1's own: its Autogrow input compacts the sockets one frame
    after a link goes and throws NullGraphError when the node has left its graph meanwhile (deleted, or converted
    into a subgraph, as the subgraph check does); a core node with an Autogrow input (BatchImagesNode) does the same."""
    return [e for e in report["page_errors"]
            if not (e.startswith("NullGraphError") and "at autogrowInputDisconnected" in e)]


def test_extension_loads_without_errors(browser_report):
    assert browser_report["extension_registered"]
    assert any("/kosmosg_prompt.js" in url for url in browser_report["extension_urls"])
    assert _page_errors(browser_report) == []
    ours = [e for e in browser_report["console_errors"] if "kosmos" in e.lower()]
    assert ours == []


def test_nodes_appear_in_the_node_library(browser_report):
    assert browser_report["kosmosg_category_nodes"] == NODE_IDS
    results = " | ".join(browser_report["search_results"])
    for title in ("Kosmos-G Loader", "Kosmos-G Interleaved Prompt", "Kosmos-G Encode", "Kosmos-G Save Conditioning",
                  "Kosmos-G Load Conditioning", "Kosmos-G Convert Checkpoint", "Kosmos-G Official Sampler",
                  "Kosmos-G Official Noise"):
        assert title in results, (f"{title!r} not offered by the search box: {results!r} "
                                  f"(error: {browser_report.get('search_error')})")
    assert browser_report["added_from_search"] == ["KosmosGInterleavedPrompt"]


def test_connecting_an_image_adds_a_socket(browser_report):
    node = browser_report["prompt_node"]
    assert _sockets(node["created"]) == ["images.image0"]
    assert _sockets(node["connected"]) == ["images.image0", "images.image1"]
    assert _sockets(node["connected_two"]) == ["images.image0", "images.image1", "images.image2"]
    assert all(i["type"] == "IMAGE" for i in node["connected_two"]["inputs"] if i["name"].startswith("images."))


def test_placeholder_counter_follows_typing_and_links(browser_report):
    node = browser_report["prompt_node"]
    expected = [("typed_one", "1 <i> / 0 images ⚠"), ("connected", "1 <i> / 1 image ✓"),
                ("typed_two", "2 <i> / 1 image ⚠"), ("connected_two", "2 <i> / 2 images ✓")]
    for moment, prefix in expected:
        summary = node[moment]["status_dom"][0]
        assert summary.startswith(prefix), f"{moment}: {summary!r}"
        assert summary == node[moment]["status"]["summary"]
    assert "connect 1 more image" in node["typed_two"]["status_dom"][0]
    assert node["typed_two"]["status"]["ok"] is False and node["connected_two"]["status"]["ok"] is True


def test_placeholders_are_numbered_against_the_sockets(browser_report):
    node = browser_report["prompt_node"]
    assert node["typed_two"]["preview_dom"][0] == "a photo of <i>₁ wearing a hat next to <i>₂"
    labels = {i["name"]: i["label"] for i in node["connected_two"]["inputs"]}
    assert labels["images.image0"] == "image0 → <i>₁"
    assert labels["images.image1"] == "image1 → <i>₂"
    assert labels["images.image2"] == "image2"  # the spare socket: plain name while nothing is missing
    # while the 2nd image is missing, the spare socket says which placeholder it would fill
    labels = {i["name"]: i["label"] for i in node["typed_two"]["inputs"]}
    assert labels["images.image1"] == "image1 → <i>₂?"


def test_weights_show_on_sockets_and_a_wrong_count_is_flagged(browser_report):
    node = browser_report["prompt_node"]
    labels = {i["name"]: i["label"] for i in node["weighted"]["inputs"]}
    assert labels["images.image0"] == "image0 → <i>₁"  # weight 1.0 is the default: not repeated
    assert labels["images.image1"] == "image1 → <i>₂ ×0.5"
    assert node["weighted"]["status_dom"][0] == "2 <i> / 2 images ✓"
    assert node["bad_weights"]["status_dom"][0] == "2 <i> / 2 images ⚠ weights has 1 value for 2 images"


def test_weights_written_in_the_text_show_on_sockets_and_a_bad_one_is_flagged(browser_report):
    node = browser_report["prompt_node"]
    assert node["typed_text"] == "a photo of <i> wearing a hat next to <i>"
    written = node["written_weights"]  # weights "2, 1" times the text's <i:0.25> and <i:0.5>
    assert written["preview_dom"][0] == "a photo of <i:0.25>₁ wearing a hat next to <i:0.5>₂"
    labels = {i["name"]: i["label"] for i in written["inputs"]}
    assert labels["images.image0"] == "image0 → <i>₁ ×0.5" and labels["images.image1"] == "image1 → <i>₂ ×0.5"
    assert written["status_dom"][0] == "2 <i> / 2 images ✓"
    bad = node["bad_written_weight"]["status_dom"][0]
    assert bad.startswith("3 <i> / 2 images ⚠") and "<i:O.8> is not a weight (write e.g. <i:0.8>)" in bad


def test_the_extension_reads_placeholders_as_the_core_does(tmp_path):
    """web/js/kosmosg_prompt.js's findPlaceholders / describe against kosmosg_core.prompt, on the same texts: the
    same placeholders, the same weights, a refusal where the core refuses (the status line must not pass what the
    server refuses, nor flag what it takes). Needs node only (the module runs with its two imports stubbed)."""
    from kosmosg_core.errors import PromptError
    from kosmosg_core.prompt import (combine_image_weights, count_placeholders, parse_image_weights,
                                     placeholder_mismatch, split_placeholders)

    if shutil.which("node") is None:
        pytest.fail("node is not installed") if os.environ.get("CI") else pytest.skip("node is not installed")
    texts = ["a <i> b", "<i:0.5><i>", "<i:>", "<i: 1.25 >", "<i:O.8>", "<i:-1>", "<i:1e-1>", "<i:\u0660.\u0665>",
             "<i:\t1>", "<i:12>", "<i:10>", "<<i>>", "<i<i:0.3>>", "<i:0.5 and <i>", "<I> < i >", "<i:1.> <i:.5>",
             "x<i:\n0.5>", "<i:0.5>>", "<i::0.5>", "<i:0.5:1>", "<i:00.50>", "<i:+1>", "<i:1,5>", "no images",
             "<i:-0>", "<i:- 1>", "<i:0x1>", "<i:\u20281>", "<i:1 >"]
    weight_lists = ["", " \t", "1.0, 0.8", "1;.5", "1. 2", "\u00a01,\u30000.5\ufeff", "+1, 0", "1e-1, 1", "0x5, 1",
                    "1_0, 1", "\uff10.\uff15, 1", "inf, 1", "-1, 1", ",", ";;", "1\x1c1", "1\x851", "1\ufeff1",
                    "1\u20281", "1, 11", "NaN, 1", "1 2 3"]
    lists = [("<i:0.5> <i:4>", [2, 3]), ("<i:0.5> <i:4>", [2, 2.5]), ("<i:0.1> <i>", [3, 1]), ("<i>", [10])]
    too_many = "<i>" * 17  # more placeholders than the node's 16 sockets, all linked: only removing one helps
    # and strings made at random from the pieces the rules care about (seeded: a failure reproduces)
    rng = random.Random(0)
    pieces = ["<i>", "<i:", "<", ">", "i", ":", "0", "1", "5", "10", ".", "-", "+", " ", "\t", "\n", "a", "e", "x",
              ",", ";", "\u0660", "\x85", "\x1c", "\ufeff", "\u00a0", "\u2028", "\uff11"]

    def number() -> str:  # mostly numbers, some nearly so
        digits = lambda: "".join(rng.choice("0123456789") for _ in range(rng.randint(0, 2)))  # noqa: E731
        return (rng.choice(["", "", "-", "+", " "]) + digits() + rng.choice(["", ".", "." + digits()]) + digits()
                + rng.choice(["", "", " ", "e1", "x", "\u0660", "\t"]))

    made = ["".join(rng.choice(pieces + [f"<i:{number()}>"] * 8) for _ in range(rng.randint(1, 8)))
            for _ in range(3000)]
    texts += made
    weight_lists += made + [rng.choice([",", ", ", ";", " ", "\u00a0", "\x85", ",,", "\n"]).join(
        number() for _ in range(rng.randint(1, 3))) for _ in range(2000)]
    source = (REPO / "web" / "js" / "kosmosg_prompt.js").read_text(encoding="utf-8")
    stubbed = source.replace('import { api } from "../../scripts/api.js";', "const api = {};").replace(
        'import { app } from "../../scripts/app.js";', 'const app = { extensions: [{ name: "KosmosG.interleavedPrompt" }] };')
    assert stubbed.count("const api = {};") == 1 and stubbed.count("const app = {") == 1, "the module's imports changed"
    (tmp_path / "prompt.mjs").write_text(stubbed, encoding="utf-8")
    (tmp_path / "cases.json").write_text(json.dumps({"texts": texts, "lists": lists, "weight_lists": weight_lists,
                                                     "too_many": too_many}),
                                         encoding="utf-8")
    (tmp_path / "run.mjs").write_text("""
        import fs from "node:fs";
        import { findPlaceholders, describe, parseWeights } from "./prompt.mjs";
        const { texts, lists, weight_lists, too_many } = JSON.parse(fs.readFileSync("cases.json", "utf8"));
        console.log(JSON.stringify({
            texts: texts.map((t) => findPlaceholders(t).map((p) => ({ weight: p.error ? null : p.weight, error: p.error }))),
            lists: lists.map(([t, w]) => describe(t, w.map((_, k) => k), w.join(", ")).ok),
            too_many: describe(too_many, [...Array(16).keys()], "").summary,
            weight_lists: weight_lists.map((w) => parseWeights(w)),
        }));""", encoding="utf-8")
    result = subprocess.run(["node", "run.mjs"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().split("\n")[-1])  # not splitlines(): it also splits at \x85
    assert [len(seen[k]) for k in ("texts", "weight_lists", "lists")] == [len(texts), len(weight_lists), len(lists)]
    for text, found in zip(texts, seen["texts"]):
        assert len(found) == count_placeholders(text), text
        try:
            weights = split_placeholders(text)[1]
        except PromptError as error:  # the core stops at the first bad placeholder: the extension's first flag
            first_flagged = next(k for k, p in enumerate(found, start=1) if p["error"])
            assert re.search(rf"\b[Pp]laceholder {first_flagged}\b", str(error)), (text, found, str(error))
            assert ("exponent" in found[first_flagged - 1]["error"]) == ("exponent" in str(error)), (text, found)
        else:
            assert [p["weight"] for p in found] == weights, (text, found)
    def blank_to_the_core(text):  # 1.0 per image, whatever their number
        try:
            return parse_image_weights(text, 0, "weights", "") == [] and parse_image_weights(text, 1, "weights", "") == [1.0]
        except PromptError:
            return False

    for text, parsed in zip(weight_lists, seen["weight_lists"]):  # the `weights` field, any count: null = blank
        assert (parsed is None) == blank_to_the_core(text), (text, parsed)
        try:
            weights = parse_image_weights(text, 0, "weights", "")
        except PromptError as error:
            if "value(s) but 0 image(s)" in str(error):  # numbers all read: the count is the only complaint
                assert parsed == [float(w) for w in parse_image_weights(text, len(parsed), "weights", "")], text
            else:  # the same entry refused for the same reason: named by the core as written, or by its value when
                # out of range
                bad, why = re.fullmatch(r'weights: "(.*)" (is not a number in|is outside|is written with an exponent)'
                                        r' .*0..10\)?', parsed["error"], flags=re.S).groups()
                if why == "is outside":
                    assert f"Image weight {float(bad):.10g} (weights) is outside" in str(error), (text, parsed)
                else:
                    named = re.match(r"weights: (.*) (is not a number|is written with an exponent)", str(error),
                                     flags=re.S)
                    assert ast.literal_eval(named.group(1)) == bad and why.startswith(named.group(2)), (text, parsed,
                                                                                                       str(error))
        else:
            assert parsed in (None, []) and weights == [], (text, parsed)
    assert seen["too_many"] == "17 <i> / 16 images ⚠ at most 16 images can be connected: remove 1 <i>"
    assert "at most 16 images can be connected: remove 1 <i>" in placeholder_mismatch(too_many, 16, 16)
    for (text, weights), ok in zip(lists, seen["lists"]):
        try:
            combine_image_weights(text, weights)
        except PromptError:
            assert ok is False, (text, weights)
        else:
            assert ok is True, (text, weights)


def test_an_image_without_placeholder_is_flagged(browser_report):
    extra = browser_report["prompt_node"]["extra_image"]
    labels = {i["name"]: i["label"] for i in extra["inputs"]}
    assert labels["images.image2"] == "image2 → no <i>"
    assert extra["status_dom"][0] == "2 <i> / 3 images ⚠ add 1 <i> to the text or disconnect 1 image"


def test_unplugging_the_first_image_renumbers_the_rest(browser_report):
    # the 1.47 frontend compacts Autogrow sockets: the second image moves up to image0 and now
    # fills the first <i>; the spare socket asks for the missing second one
    gap = browser_report["prompt_node"]["gap"]
    sockets = [(i["name"], i["label"], i["linked"]) for i in gap["inputs"] if i["name"].startswith("images.")]
    assert sockets == [("images.image0", "image0 → <i>₁", True), ("images.image1", "image1 → <i>₂?", False)]
    assert gap["status_dom"][0].startswith("2 <i> / 1 image ⚠")


def test_text_from_a_link_is_not_counted_from_the_hidden_widget(browser_report):
    """Found by a review: with `text` fed by a String node the status counted the widget's hidden default text (a
    false warning, or a false tick), though the server gets the linked text."""
    linked, unlinked = browser_report["prompt_node"]["linked_text"], browser_report["prompt_node"]["unlinked_text"]
    assert linked["status_dom"][0] == "text from a link / 1 image: the <i> count is checked when it runs"
    assert linked["preview_dom"][0] == "(text from a link)" and linked["status"]["ok"] is True
    bad = browser_report["prompt_node"]["linked_text_bad_weights"]
    assert bad["status_dom"][0].endswith("⚠ weights has 2 values for 1 image") and bad["status"]["ok"] is False
    assert unlinked["status_dom"][0] == browser_report["prompt_node"]["gap"]["status_dom"][0]  # back to the widget
    # its source muted, the link sends nothing: the frontend sends the widget's text, and the status counts it
    muted = browser_report["prompt_node"]["muted_text_source"]
    assert muted["api_text"] == "a photo of <i> wearing a hat next to <i>"
    assert muted["status_dom"][0] == browser_report["prompt_node"]["gap"]["status_dom"][0]
    assert muted["preview_dom"][0] != "(text from a link)"


def test_ui_submits_text_and_sockets_but_not_the_status_widget(browser_report):
    inputs = browser_report["prompt_node"]["api_inputs"]
    assert inputs["text"] == "a photo of <i> wearing a hat next to <i>"
    assert inputs["weights"] == ""
    assert isinstance(inputs["images.image0"], list) and isinstance(inputs["images.image1"], list)
    assert "kosmosg_status" not in inputs and "images.image2" not in inputs


def test_shipped_workflow_loads_queues_and_shows_its_image(browser_report):
    workflow = browser_report["workflow"]
    assert {"KosmosGLoader", "KosmosGInterleavedPrompt", "KosmosGEncode", "KosmosGOfficialSampler", "SamplerCustom",
            "SaveImage"} <= set(workflow["node_types"])
    assert {"CheckpointLoaderSimple.ckpt_name", "KosmosGLoader.checkpoint", "KosmosGOfficialSampler.steps"} <= set(
        workflow["substituted"])
    assert workflow["prompt_status"]["summary"] == "2 <i> / 2 images ✓"
    # loading keeps every socket and link (the spare-socket trim runs only once the links are restored)
    assert workflow["prompt_sockets"] == [["images.image0", True], ["images.image1", True], ["images.image2", False]]
    output = browser_report["output"]
    assert len(output["images"]) == 1 and output["images"][0]["type"] == "output"
    assert output["natural_sizes"] == [[64, 64]]
    assert output["view"]["status"] == 200 and output["view"]["type"] == "image/png"
    assert bytes(output["view"]["head"]) == b"\x89PNG\r\n\x1a\n"


def test_copy_paste_keeps_every_image_connection(browser_report):
    # the frontend's paste configures a copy whose sockets come back as image0, text, weights, image1, ...
    # while the copied links keep the original slot numbers: every image but the first was lost until the
    # extension put the sockets back in order
    copies = browser_report["copy_paste"]
    for how, source in (("paste_connected", "LoadImage"), ("paste_group", "LoadImage (copy)")):
        copy = copies[how]
        sockets = [(s["name"], s["linked"], s["from"]) for s in copy["sockets"]]
        assert sockets == [("images.image0", True, source), ("images.image1", True, source),
                           ("images.image2", False, None)], how
        assert copy["status"] == "2 <i> / 2 images ✓", how
        assert copy["api_image_inputs"] == ["images.image0", "images.image1"], how


def test_a_copy_pasted_without_links_keeps_one_spare_socket(browser_report):
    # the copy comes back with every socket of the original (image0..image2), all empty; the Autogrow rule is one
    # spare socket after the last connected one, so it keeps image0 alone
    copy = browser_report["copy_paste"]["paste_alone"]
    assert [(s["name"], s["linked"]) for s in copy["sockets"]] == [("images.image0", False)]
    assert copy["status"] == "2 <i> / 0 images ⚠ connect 2 more images or remove 2 <i>"
    assert copy["api_image_inputs"] == []


def test_bypassed_or_muted_loaders_are_not_counted(browser_report):
    # graphToPrompt sends no image from a muted node, nor from a bypassed LoadImage (it has no IMAGE input to
    # pass on): the server would refuse the prompt, so the status line must say so, naming the socket
    modes = browser_report["modes"]
    loader = modes["both"]["titles"]["second"]  # "Load Image"
    for moment, mode in (("both", 0), ("bypassed", 4), ("unbypassed", 0), ("muted", 2), ("unmuted", 0)):
        assert modes[moment]["modes"]["second"] == mode, f"{moment}: the shortcut did not set the mode"
        assert modes[moment]["status_dom"] == modes[moment]["status"]["summary"], moment
    for moment in ("both", "unbypassed", "unmuted"):
        assert modes[moment]["status_dom"] == "2 <i> / 2 images ✓", moment
        assert modes[moment]["api_images"] == {"images.image0": "first", "images.image1": "second"}, moment
        assert modes[moment]["labels"]["images.image1"] == "image1 → <i>₂", moment
    for moment, why in (("bypassed", "bypassed"), ("muted", "muted")):
        state = modes[moment]
        assert state["status_dom"] == (f"2 <i> / 1 image ⚠ image1's {loader} is {why}, so it sends no image; "
                                       "connect 1 more image or remove 1 <i>"), moment
        assert state["status"]["ok"] is False
        assert state["status"]["skipped"] == [{"socket": "image1", "node": state["status"]["skipped"][0]["node"],
                                               "why": why}]
        # what the status counts is what queueing sends
        assert state["api_images"] == {"images.image0": "first"}, moment
        assert state["labels"]["images.image1"] == f"image1 ({why}, skipped)", moment


def test_a_bypassed_node_passing_an_image_through_still_counts(browser_report):
    # a bypassed ImageScale hands on the IMAGE of its own input (graphToPrompt links the loader behind it);
    # a Reroute node is followed to its source
    modes = browser_report["modes"]
    loader = modes["both"]["titles"]["second"]
    assert modes["through_scale"]["api_images"] == {"images.image0": "first", "images.image1": "scale"}
    assert modes["through_scale"]["status_dom"] == "2 <i> / 2 images ✓"
    state = modes["scale_bypassed"]
    assert state["modes"]["scale"] == 4
    assert state["api_images"] == {"images.image0": "first", "images.image1": "second"}
    assert state["status_dom"] == "2 <i> / 2 images ✓"
    # ...nothing when its own input is unplugged (a link change upstream also refreshes the status)
    state = modes["scale_bypassed_unplugged"]
    scale = state["titles"]["scale"]  # "Upscale Image"
    assert state["api_images"] == {"images.image0": "first"}
    assert state["status_dom"].startswith(f"2 <i> / 1 image ⚠ image1's {scale} is bypassed, so it sends no image")
    assert modes["scale_bypassed_replugged"]["status_dom"] == "2 <i> / 2 images ✓"
    # ...and not when the loader behind it is bypassed or muted too: the loader is named
    for moment, why in (("scale_and_loader_bypassed", "bypassed"), ("scale_bypassed_loader_muted", "muted")):
        state = modes[moment]
        assert state["api_images"] == {"images.image0": "first"}, moment
        assert state["status_dom"].startswith(f"2 <i> / 1 image ⚠ image1's {loader} is {why}, so it sends no image"), (
            moment, state["status_dom"])
    state = modes["first_muted_behind_reroute"]
    assert state["api_images"] == {}
    assert state["status_dom"] == (f"2 <i> / 0 images ⚠ image0's {loader} is muted, so it sends no image; "
                                   f"image1's {loader} is muted, so it sends no image; "
                                   "connect 2 more images or remove 2 <i>")


def test_an_active_node_fed_by_a_muted_or_bypassed_one_is_named(browser_report):
    # Load Image (muted or bypassed) -> Upscale Image (active) -> image1: graphToPrompt sends the Upscale Image
    # without its required image, and the server refuses the prompt ("Required input is missing"); the socket's
    # link itself is sent, so the image counts, and the status line names the chain
    modes = browser_report["modes"]
    loader, scale = modes["both"]["titles"]["second"], modes["through_scale"]["titles"]["scale"]
    for moment, why in (("scale_active_loader_muted", "muted"), ("scale_active_loader_bypassed", "bypassed")):
        state = modes[moment]
        assert state["modes"]["scale"] == 0 and state["modes"]["second"] == (2 if why == "muted" else 4), moment
        assert state["api_images"] == {"images.image0": "first", "images.image1": "scale"}, moment
        assert state["api_links"]["scale"] == [], moment  # sent without its image
        assert state["status_dom"] == state["status"]["summary"] == (
            f"2 <i> / 2 images ⚠ image1's {scale} gets no image: its {loader} is {why}"), moment
        assert state["status"]["ok"] is False
        assert [(r["socket"], r["input"], r["why"]) for r in state["status"]["refused"]] == [("image1", "image", why)]
        assert state["labels"]["images.image1"] == "image1 → <i>₂ (input missing upstream)", moment
    back = modes["scale_active_loader_back"]
    assert back["api_links"]["scale"] == ["image"] and back["status_dom"] == "2 <i> / 2 images ✓"
    assert back["labels"]["images.image1"] == "image1 → <i>₂"


def test_a_refusal_behind_an_optional_input_is_named(browser_report):
    # image1 <- ImageCompositeMasked, whose optional mask <- ImageToMask <- a third Load Image. Muted, that loader
    # leaves the ImageToMask without its required image; the mask link is still sent, so the server checks the
    # ImageToMask and refuses the prompt: the walk goes on up through optional inputs too
    modes = browser_report["modes"]
    fine, muted = modes["mask_from_third"], modes["mask_loader_muted"]
    assert fine["api_links"]["to_mask"] == ["image"] and "mask" in fine["api_links"]["composite"]
    assert fine["status_dom"] == "2 <i> / 2 images ✓"
    assert muted["modes"]["third"] == 2
    assert muted["api_links"]["to_mask"] == [] and "mask" in muted["api_links"]["composite"]
    to_mask, loader = muted["titles"]["to_mask"], muted["titles"]["third"]
    assert muted["status_dom"] == muted["status"]["summary"] == (
        f"2 <i> / 2 images ⚠ image1's {to_mask} gets no image: its {loader} is muted")


def test_a_prompt_node_inside_a_subgraph_follows_its_loaders(browser_report):
    # the prompt node and its second loader inside a subgraph, the first loader outside (through the subgraph's
    # input): Ctrl+B / Ctrl+M inside, and a script muting the loader outside, update the status line, which says
    # what graphToPrompt sends (API ids "<subgraph node>:<node>", mapped back to names by the browser script)
    inside = browser_report["subgraphs"]["inside"]
    for moment in ("both", "unbypassed", "unmuted", "outer_unmuted"):
        assert inside[moment]["api_images"] == {"images.image0": "first", "images.image1": "second"}, moment
        assert inside[moment]["status_dom"] == inside[moment]["status"]["summary"] == "2 <i> / 2 images ✓", moment
    for moment, loader, mode, socket, sent in (("bypassed", "second", 4, 1, {"images.image0": "first"}),
                                               ("muted", "second", 2, 1, {"images.image0": "first"}),
                                               ("outer_muted", "first", 2, 0, {"images.image1": "second"})):
        state = inside[moment]
        why = "bypassed" if mode == 4 else "muted"
        assert state["modes"][loader] == mode, f"{moment}: the mode was not set"
        assert state["api_images"] == sent, moment
        assert state["status_dom"] == state["status"]["summary"] == (
            f"2 <i> / 1 image ⚠ image{socket}'s Load Image is {why}, so it sends no image; "
            "connect 1 more image or remove 1 <i>"), moment
        assert state["labels"][f"images.image{socket}"] == f"image{socket} ({why}, skipped)", moment


def test_a_bypassed_subgraph_node_passes_on_its_input(browser_report):
    # a subgraph node wrapping an Upscale Image: bypassed, graphToPrompt links what reaches its input (the second
    # loader) like for any bypassed node, so a muted loader there leaves the socket empty; active, the Upscale Image
    # inside gets nothing from the muted loader and the server refuses it
    wrapped = browser_report["subgraphs"]["wrapped"]
    for moment, source in (("through", "scale"), ("bypassed", "second"), ("back", "scale")):
        assert wrapped[moment]["api_images"] == {"images.image0": "first", "images.image1": source}, moment
        assert wrapped[moment]["status_dom"] == "2 <i> / 2 images ✓", moment
    assert wrapped["bypassed"]["modes"]["subgraph"] == 4
    state = wrapped["bypassed_loader_muted"]
    assert state["api_images"] == {"images.image0": "first"}
    assert state["status_dom"] == ("2 <i> / 1 image ⚠ image1's Load Image is muted, so it sends no image; "
                                   "connect 1 more image or remove 1 <i>")
    state = wrapped["active_loader_muted"]
    assert state["modes"]["subgraph"] == 0 and state["api_links"]["scale"] == []
    assert state["status_dom"] == "2 <i> / 2 images ⚠ image1's Upscale Image gets no image: its Load Image is muted"
    # the server refuses that Upscale Image, as the status line says
    assert state["server"]["status"] == 400
    assert {"class_type": "ImageScale", "errors": ["Required input is missing: image"]} in state["server"]["node_errors"].values()


def test_screenshots_are_saved(browser_report):
    for name in ("node-search", "prompt-node", "workflow", "workflow-output", "prompt-node-bypassed-loader",
                 "prompt-node-refused-upstream"):
        path = browser_report["screenshot_dir"] / f"{name}.png"
        assert path.is_file() and path.read_bytes().startswith(b"\x89PNG"), path


# --- the frontend's Vue node rendering mode ("Nodes 2.0", the setting Comfy.VueNodes.Enabled) ---------------------
# There the nodes are Vue components in the page, not drawn on the canvas; the status line (a DOM widget) is mounted
# inside the node's component. tests/browser/vue_check.mjs turns the mode on (and back off), builds prompt + two
# loaders, types a text with two <i>, bypasses a loader, copies + pastes the prompt node, mutes the loader behind an
# Upscale Image and loads the shipped workflow; each moment read from the page and from app.graphToPrompt(). Runs
# after browser_report's checks (this order matters only if vue_check.mjs failed to restore the setting, which it
# reports).


def _frontend(report) -> tuple[int, ...]:
    """The served frontend's version, (major, minor)."""
    return tuple(int(p) for p in (report.get("frontend_version") or "0").split(".")[:2])


def _vue_sockets(state) -> list[tuple]:
    """(socket, linked, where its link comes from: a node vue_check.mjs names, or its type) per image socket."""
    return [(s["name"], s["linked"], s["from"]) for s in state["sockets"]]


def _assert_vue_socket_names(report, state, moment):
    """Each image socket's name as the node's component shows it. From 1.53 on: the extension's label. On 1.47.12: the
    label as it was when the node's slots last rendered (see test_vue_nodes_mode_shows_the_socket_labels), which for a
    new, pasted or loaded node is the frontend's own "imageN", and never the label a copy or a saved workflow brought
    along (the extension puts the frontend's own back when the node is configured: the old code showed the original's
    "image0 → <i>₁" on the empty socket of a copy pasted alone)."""
    for socket in state["sockets"]:
        if _frontend(report) >= (1, 53):
            assert socket["shown"] == socket["label"], (moment, socket)
        else:
            assert socket["shown"] in (socket["label"], socket["name"].split(".", 1)[1]), (moment, socket)


@pytest.fixture(scope="module")
def vue_report(comfy, tmp_path_factory):
    shots = Path(os.environ.get("KOSMOSG_SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots-vue"))
    report = run_browser_script("vue_check.mjs", comfy, shots, "--workflow", str(WORKFLOW),
                                "--substitute", json.dumps(SUBSTITUTIONS), timeout=300)
    if not report["available"]:
        # every frontend this pack is tested with (1.47.12 pinned, 1.53.10, 1.58.1) has the setting
        pytest.skip(f"the served frontend ({report.get('frontend_version')}) has no Comfy.VueNodes.Enabled setting "
                    "(no Vue node rendering mode to check)")
    return report


def test_vue_nodes_mode_shows_the_status_line_in_the_node(vue_report):
    vue = vue_report["vue"]
    assert _page_errors(vue_report) == []
    assert [e for e in vue_report["console_errors"] if "kosmos" in e.lower()] == []
    for moment in ("connected", "typed", "bypassed", "unbypassed"):
        state = vue[moment]
        assert state["vue_mode"] is True and state["vue_node_elements"] >= 3, f"{moment}: Vue nodes not rendered"
        assert state["summary_count"] == 1 and state["summary_total"] == state["prompt_nodes"] == 1, moment
        assert state["summary_in_node"] and state["summary_visible"] and state["summary_on_top"], (moment, state)
        assert state["summary_text"] == state["status"]["summary"], moment


def test_vue_nodes_mode_counts_typed_placeholders_and_bypassed_loaders(vue_report):
    vue = vue_report["vue"]
    assert vue["type_error"] is None
    typed = vue["typed"]
    assert typed["text_value"] == "a photo of <i> next to <i>"  # typed into the Vue textarea, as a user
    assert typed["summary_text"] == "2 <i> / 2 images ✓"
    assert typed["preview_text"] == "a photo of <i>₁ next to <i>₂"
    assert typed["labels"] == ["image0 → <i>₁", "image1 → <i>₂", "image2"]
    bypassed = vue["bypassed"]
    assert bypassed["modes"]["second"] == 4, "Ctrl+B did not bypass the loader"
    assert bypassed["summary_text"] == ("2 <i> / 1 image ⚠ image1's Load Image is bypassed, so it sends no image; "
                                        "connect 1 more image or remove 1 <i>")
    assert bypassed["labels"][1] == "image1 (bypassed, skipped)"
    assert vue["unbypassed"]["modes"]["second"] == 0 and vue["unbypassed"]["summary_text"] == "2 <i> / 2 images ✓"
    assert vue_report["restored"], "the Vue nodes setting was not put back"


def test_vue_nodes_mode_shows_the_socket_labels(vue_report):
    # node.inputs[k].label, which the canvas draws: the Vue node components of frontends from 1.53 on show it as
    # it changes. 1.47.12's do not: its slot components read the label once, from a slot object its Vue layer
    # does not track (a shallowReactive inputs array), and nothing re-renders them when it changes; its own
    # "node:slot-label:changed" event (what its rename sends) does not either. There the sockets keep their plain
    # names (image0, image1, ...) while the status line and the preview above say the same; this branch
    # documents that and fails once the frontend shows them. (A slot shows the label it had when the node's slots
    # last rendered: on mount, or when something else re-renders them, as a paste does: see _assert_vue_socket_names.)
    vue = vue_report["vue"]
    version = _frontend(vue_report)
    moments = [("typed", "image0 → <i>₁"), ("typed", "image1 → <i>₂"), ("bypassed", "image1 (bypassed, skipped)"),
               ("unbypassed", "image1 → <i>₂")]
    for moment, label in moments:
        assert label in vue[moment]["labels"], moment  # the extension set it on the node in every frontend
        shown = label in vue[moment]["node_text"]
        if version >= (1, 53):
            assert shown, (moment, label, vue[moment]["node_text"])
        else:
            assert not shown, f"{moment}: frontend {version} now shows socket labels in Vue nodes mode"


def test_vue_nodes_mode_copy_paste_keeps_links_and_one_spare_socket(vue_report):
    # the prompt node (two <i>, two loaders linked) copied with Ctrl+C: Ctrl+Shift+V pastes it linked to the same
    # loaders, its sockets in order; Ctrl+V pastes it alone, left with one spare socket. Each copy as its component
    # shows it and as graphToPrompt sends it; the original is untouched.
    copies = vue_report["copy_paste"]
    spare = ("images.image2", False, None)
    connected = copies["connected"]
    assert _vue_sockets(connected) == [("images.image0", True, "first"), ("images.image1", True, "second"), spare]
    assert connected["dom_slot_order"] == ["images.image0", "images.image1", "images.image2"]
    assert connected["api_images"] == {"images.image0": "first", "images.image1": "second"}
    assert connected["summary_text"] == connected["status"]["summary"] == "2 <i> / 2 images ✓"
    assert connected["labels"] == ["image0 → <i>₁", "image1 → <i>₂", "image2"]
    alone = copies["alone"]
    assert _vue_sockets(alone) == [("images.image0", False, None)]
    assert alone["dom_slot_order"] == ["images.image0"]
    assert alone["api_images"] == {} and alone["api_links"]["copy_alone"] == []
    assert alone["summary_text"] == alone["status"]["summary"] == (
        "2 <i> / 0 images ⚠ connect 2 more images or remove 2 <i>")
    assert alone["labels"] == ["image0 → <i>₁?"]
    original = copies["original"]
    assert _vue_sockets(original) == [("images.image0", True, "first"), ("images.image1", True, "second"), spare]
    assert original["api_images"] == {"images.image0": "first", "images.image1": "second"}
    assert original["summary_text"] == "2 <i> / 2 images ✓"
    for moment, state in copies.items():
        assert state["text_value"] == "a photo of <i> next to <i>", moment
        assert state["summary_count"] == 1 and state["summary_total"] == state["prompt_nodes"], moment
        assert state["summary_in_node"] and state["summary_visible"], moment
        _assert_vue_socket_names(vue_report, state, moment)


def test_vue_nodes_mode_loads_the_shipped_workflow(vue_report):
    workflow = vue_report["workflow"]
    assert {"CheckpointLoaderSimple.ckpt_name", "KosmosGLoader.checkpoint"} <= set(workflow["substituted"])
    loaded = workflow["loaded"]
    shipped = len(json.loads(WORKFLOW.read_text())["nodes"])
    assert loaded["vue_node_elements"] == loaded["graph_nodes"] == shipped  # every node of it is a Vue component
    assert _vue_sockets(loaded) == [("images.image0", True, "first"), ("images.image1", True, "second"),
                                    ("images.image2", False, None)]
    assert loaded["dom_slot_order"] == ["images.image0", "images.image1", "images.image2"]
    assert loaded["api_images"] == {"images.image0": "first", "images.image1": "second"}
    assert loaded["summary_count"] == 1 and loaded["summary_in_node"]
    assert loaded["summary_text"] == loaded["status"]["summary"] == "2 <i> / 2 images ✓"
    assert loaded["preview_text"] == "<i>₁ and <i>₂ sitting together in a garden"
    assert loaded["labels"] == ["image0 → <i>₁", "image1 → <i>₂", "image2"]
    _assert_vue_socket_names(vue_report, loaded, "loaded")


def test_vue_nodes_mode_names_a_node_the_server_would_refuse(vue_report):
    # Load Image (muted with Ctrl+M) -> Upscale Image (active) -> image1: graphToPrompt sends the Upscale Image without
    # its required image (the server refuses the prompt); the status line in the node's component names the chain
    refused = vue_report["refused"]
    for moment in ("through_scale", "loader_back"):
        state = refused[moment]
        assert state["modes"] == {"prompt": 0, "first": 0, "second": 0, "scale": 0}, moment
        assert state["api_images"] == {"images.image0": "first", "images.image1": "scale"}, moment
        assert state["api_links"]["scale"] == ["image"], moment
        assert state["summary_text"] == state["status"]["summary"] == "2 <i> / 2 images ✓", moment
        assert state["labels"][1] == "image1 → <i>₂", moment
    state = refused["loader_muted"]
    assert state["modes"]["second"] == 2 and state["modes"]["scale"] == 0, "Ctrl+M did not mute the loader"
    assert state["api_images"] == {"images.image0": "first", "images.image1": "scale"}
    assert state["api_links"]["scale"] == [] and "second" not in state["api_links"]  # sent without its image
    assert state["summary_text"] == state["status"]["summary"] == (
        "2 <i> / 2 images ⚠ image1's Upscale Image gets no image: its Load Image is muted")
    assert state["status"]["ok"] is False
    assert [(r["socket"], r["input"], r["why"]) for r in state["status"]["refused"]] == [("image1", "image", "muted")]
    assert state["labels"][1] == "image1 → <i>₂ (input missing upstream)"
    assert state["summary_in_node"] and state["summary_visible"] and state["summary_on_top"]
    for moment, state in refused.items():
        _assert_vue_socket_names(vue_report, state, moment)


def _rgb(hex_colour: str) -> str:
    """"#4fc3f7" -> "rgb(79, 195, 247)", as getComputedStyle writes a colour."""
    return "rgb({}, {}, {})".format(*(int(hex_colour[k:k + 2], 16) for k in (1, 3, 5)))


def test_vue_nodes_mode_paints_socket_dots_by_type_only(vue_report):
    # The extension gives each linked image socket a colour (input.color_on): its <i>'s pair colour (the preview's
    # chip colour), amber where its image is skipped or a node upstream is refused; the classic canvas paints a
    # connected socket's dot with it. The Vue nodes of 1.47.12, 1.53.10 and 1.58.1 paint a socket's dot from its type
    # alone (var(--color-datatype-IMAGE)), ignoring color_on: a frontend limit, documented here (and in the README's
    # Vue-mode paragraph). This fails once a frontend paints color_on: then assert the pair colours instead.
    pair, amber = ["#4fc3f7", "#ffb74d"], "#ffa726"
    moments = [("typed", vue_report["vue"]["typed"], [pair[0], pair[1], None]),
               ("bypassed", vue_report["vue"]["bypassed"], [pair[0], amber, None]),
               ("refused", vue_report["refused"]["loader_muted"], [pair[0], amber, None])]
    for moment, state, colours in moments:
        sockets = state["sockets"]
        assert [s["color_on"] for s in sockets] == colours, moment  # what the extension set
        type_colour = sockets[-1]["dot"]  # the spare socket: no colour of its own
        assert type_colour and type_colour.startswith("rgb"), (moment, sockets)
        for socket in sockets[:-1]:
            assert socket["dot"] != _rgb(socket["color_on"]), (
                f"{moment}: frontend {vue_report.get('frontend_version')} now paints input.color_on in Vue nodes mode: "
                "assert the pair colours here and update the README")
            assert socket["dot"] == type_colour, (moment, socket)


def test_vue_nodes_mode_screenshots_are_saved(vue_report):
    for name in ("vue-prompt-node", "vue-prompt-node-bypassed-loader", "vue-prompt-node-pasted",
                 "vue-prompt-node-refused-upstream", "vue-workflow"):
        path = vue_report["screenshot_dir"] / f"{name}.png"
        assert path.is_file() and path.read_bytes().startswith(b"\x89PNG"), path


# --- every shipped workflow, in the classic canvas and in Vue nodes mode: no node covers another ------------------
# Vue node components are taller than the canvas draws the same nodes (a node grows to fit its widgets), so a layout
# made for the canvas alone can put a node over its neighbour there. tests/browser/layout_check.mjs loads each workflow
# (test models substituted) in both modes and measures each node's box as the user sees it, title bar included.

MIN_GAP = 20  # graph units between two nodes' boxes: less reads as touching (the generator leaves 50)


@pytest.fixture(scope="module")
def layout_report(comfy, tmp_path_factory):
    shots = Path(os.environ.get("KOSMOSG_SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots-layout"))
    substitutions = {**SUBSTITUTIONS, "control_net_name": comfy_tiny_models.CONTROLNET_NAME,
                     "lora_name": comfy_tiny_models.LORA_NAME}  # no loader marked missing in the screenshots
    return run_browser_script("layout_check.mjs", comfy, shots, "--substitute", json.dumps(substitutions),
                              "--min-gap", str(MIN_GAP), *map(str, WORKFLOWS), timeout=420)


@pytest.mark.parametrize("mode", ["classic", "vue"])
def test_no_node_of_a_shipped_workflow_covers_another(layout_report, mode):
    if mode == "vue" and not layout_report["vue_available"]:
        pytest.skip(f"the served frontend ({layout_report.get('frontend_version')}) has no Vue nodes mode")
    results = layout_report["modes"][mode]
    assert sorted(results) == [p.stem for p in WORKFLOWS]
    for name, result in results.items():
        # every node measured: in Vue mode each one is a component in the page
        assert result["unmeasured"] == [] and len(result["boxes"]) == result["nodes"], (mode, name, result)
        if mode == "vue":
            assert result["vue_node_elements"] == result["nodes"], (mode, name)
        assert not result.get("previews_missing"), f"{mode}, {name}: the Load Image previews did not arrive"
    crowded = {name: result["crowded"] for name, result in results.items() if result["crowded"]}
    assert crowded == {}, (f"frontend {layout_report.get('frontend_version')}, {mode} mode: nodes overlapping or "
                           f"closer than {MIN_GAP} (see layout-{mode}-*.png in {layout_report['screenshot_dir']}): "
                           f"{json.dumps(crowded, indent=1)}")
    if mode == "vue":
        assert layout_report["restored"], "the Vue nodes setting was not put back"
