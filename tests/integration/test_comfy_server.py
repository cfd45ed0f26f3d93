"""The pack inside a real ComfyUI 0.30.0 server: import, schema, shipped workflows, stock-node
compatibility, determinism, save/load, and errors reported through the API.

Tiny random models (generated at test time) keep every graph at 64x64 and 2 sampler steps.
"""

from __future__ import annotations

import copy
import io
import json

import pytest

from support import comfy_tiny_models
from support.comfy_server import execution_error, free_port
from support.workflow_api import schema_problems, substitute, ui_to_api

from .conftest import PACK_NAME, REPO, TINY_KOSMOSG, TINY_KOSMOSG_PT

pytestmark = pytest.mark.integration

WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
NODE_IDS = ["KosmosGLoader", "KosmosGInterleavedPrompt", "KosmosGEncode", "KosmosGSaveConditioning",
            "KosmosGLoadConditioning", "KosmosGConvertCheckpoint", "KosmosGOfficialSampler",
            "KosmosGOfficialNoise", "KosmosGCheckpointSD15"]
TEST_STEPS = 2
TEST_SIZE = 64


# --- graph builders (API format) -------------------------------------------------------------------
def encode_graph(text="a photo of <i> on the beach", images=("kosmosg_subject_1.png",), weights="",
                 kosmosg=TINY_KOSMOSG):
    """Nodes 1-4: SD checkpoint, Kosmos-G loader, LoadImage(s) (ids 10+), prompt (3), encode (4)."""
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": comfy_tiny_models.UNET_NAME}},
        "2": {"class_type": "KosmosGLoader", "inputs": {"checkpoint": kosmosg, "dtype": "auto", "device": "auto"}},
        "3": {"class_type": "KosmosGInterleavedPrompt", "inputs": {"text": text, "weights": weights}},
        "4": {"class_type": "KosmosGEncode", "inputs": {"model": ["2", 0], "prompt": ["3", 0], "negative_text": ""}},
    }
    for i, name in enumerate(images):
        graph[str(10 + i)] = {"class_type": "LoadImage", "inputs": {"image": name}}
        graph["3"]["inputs"][f"images.image{i}"] = [str(10 + i), 0]
    return graph


def add_sampling(graph, positive=("4", 0), negative=("4", 1), seed=42, batch=1, prefix="kg-test"):
    graph.update({
        "20": {"class_type": "EmptyLatentImage", "inputs": {"width": TEST_SIZE, "height": TEST_SIZE, "batch_size": batch}},
        "21": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": list(positive), "negative": list(negative), "latent_image": ["20", 0],
            "seed": seed, "steps": TEST_STEPS, "cfg": 6.0, "sampler_name": "dpmpp_2m", "scheduler": "normal",
            "denoise": 1.0}},
        "22": {"class_type": "VAEDecode", "inputs": {"samples": ["21", 0], "vae": ["1", 2]}},
        "23": {"class_type": "SaveImage", "inputs": {"images": ["22", 0], "filename_prefix": prefix}},
    })
    return graph


def pixels(png: bytes):
    from PIL import Image
    import numpy as np

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def assert_success(comfy, entry):
    err = execution_error(entry)
    assert entry["status"]["status_str"] == "success", f"run failed: {json.dumps(err, indent=1)[:3000]}\n{comfy.log_tail()}"


# --- tests ------------------------------------------------------------------------------------------
def test_pack_imports_without_failure(comfy):
    assert comfy.import_failures([PACK_NAME, REPO.name]) == []
    info = comfy.object_info()
    missing = [n for n in NODE_IDS if n not in info]
    assert not missing, f"nodes missing from /object_info: {missing}\n{comfy.log_tail()}"


def test_template_browser_lists_every_shipped_workflow_with_its_thumbnail(comfy):
    """The frontend's template browser lists GET /workflow_templates and shows /api/workflow_templates/<pack>/<name>.jpg
    (conventions: a same-name .jpg thumbnail; found missing by a review)."""
    from PIL import Image

    templates = comfy.get_json("/workflow_templates")
    shipped = sorted(p.stem for p in (REPO / "workflows").glob("*.json"))
    assert sorted(templates[PACK_NAME]) == shipped
    for name in shipped:
        status, body = comfy.get(f"/api/workflow_templates/{PACK_NAME}/{name}.jpg")
        assert status == 200, name
        with Image.open(io.BytesIO(body)) as thumbnail:
            assert thumbnail.format == "JPEG" and thumbnail.width == 512, name


def test_object_info_schema(comfy):
    info = comfy.object_info()
    expected = {
        "KosmosGLoader": ({"checkpoint": "COMBO", "dtype": "COMBO", "device": "COMBO"}, ["KOSMOSG_MODEL"]),
        "KosmosGInterleavedPrompt": ({"text": "STRING", "images": "COMFY_AUTOGROW_V3", "weights": "STRING"},
                                     ["KOSMOSG_PROMPT"]),
        "KosmosGEncode": ({"model": "KOSMOSG_MODEL", "prompt": "KOSMOSG_PROMPT", "negative_text": "STRING",
                           "disk_cache": "BOOLEAN"},
                          ["CONDITIONING", "CONDITIONING"]),
        "KosmosGSaveConditioning": ({"conditioning": "CONDITIONING", "filename_prefix": "STRING"}, ["STRING"]),
        "KosmosGLoadConditioning": ({"conditioning_file": "COMBO"}, ["CONDITIONING"]),
        "KosmosGConvertCheckpoint": ({"source": "COMBO", "output_name": "STRING", "dtype": "COMBO",
                                     "overwrite": "BOOLEAN"}, ["STRING"]),
        "KosmosGOfficialSampler": ({"model": "MODEL", "steps": "INT", "scheduler": "COMBO"}, ["SAMPLER", "SIGMAS"]),
        "KosmosGOfficialNoise": ({"noise_seed": "INT", "dtype": "COMBO"}, ["NOISE"]),
        "KosmosGCheckpointSD15": ({"checkpoint": "COMBO"}, ["MODEL", "VAE"]),
    }
    for node_id, (inputs, outputs) in expected.items():
        node = info[node_id]
        assert node["category"] == "Kosmos-G"
        assert len(node["description"]) > 40, node_id
        declared = {**node["input"].get("required", {}), **node["input"].get("optional", {})}
        assert {k: v[0] for k, v in declared.items()} == inputs, node_id
        for name, spec in declared.items():
            assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert node["output"] == outputs, node_id
        assert all(node["output_tooltips"]), f"{node_id} has an output without tooltip"
    assert info["KosmosGEncode"]["output_name"] == ["positive", "negative"]
    assert "negative_text" in info["KosmosGEncode"]["input"]["optional"]
    assert info["KosmosGLoader"]["input"]["required"]["dtype"][1]["options"] == ["auto", "fp16", "bf16", "fp32"]
    assert TINY_KOSMOSG_PT in info["KosmosGLoader"]["input"]["required"]["checkpoint"][1]["options"]
    template = info["KosmosGInterleavedPrompt"]["input"]["required"]["images"][1]["template"]
    assert template["prefix"] == "image" and template["min"] == 0 and template["max"] >= 8


def test_convert_node_writes_loadable_safetensors(comfy):
    """The node's conversion is the core's (the file the other tests load): same tensors, and the loader lists it."""
    import torch
    from safetensors.torch import load_file

    graph = {"1": {"class_type": "KosmosGConvertCheckpoint",
                   "inputs": {"source": TINY_KOSMOSG_PT, "output_name": "tiny-by-node", "dtype": "fp32",
                              "overwrite": False}}}
    entry = comfy.run(graph)
    assert_success(comfy, entry)
    folder = comfy.data / "models" / "kosmosg"
    by_node, by_core = load_file(str(folder / "tiny-by-node.safetensors")), load_file(str(folder / TINY_KOSMOSG))
    assert set(by_node) == set(by_core) and all(torch.equal(by_node[k], by_core[k]) for k in by_core)
    options = comfy.object_info("KosmosGLoader")["input"]["required"]["checkpoint"][1]["options"]
    assert "tiny-by-node.safetensors" in options


@pytest.mark.parametrize("workflow_path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_shipped_workflow_runs(comfy, workflow_path):
    prompt = shipped_workflow_with_tiny_models(comfy, workflow_path)
    classes = {node["class_type"] for node in prompt.values()}
    assert {"KosmosGLoader", "KosmosGInterleavedPrompt", "KosmosGEncode", "SaveImage"} <= classes
    nano = "nano" in workflow_path.stem  # the nano evaluation's sampler; real models: the official demo's
    assert {"KSampler"} <= classes if nano else "KosmosGOfficialSampler" in classes
    if "demo" in workflow_path.stem:  # its noise too, and the SD1.5 networks the official file stores
        assert {"KosmosGOfficialNoise", "CFGGuider", "SamplerCustomAdvanced", "KosmosGCheckpointSD15"} <= classes
        assert "CheckpointLoaderSimple" not in classes
    elif not nano:
        assert "SamplerCustom" in classes
    entry = comfy.run(prompt)
    assert_success(comfy, entry)
    images = comfy.output_images(entry)
    assert len(images) == 1
    assert pixels(images[0]).shape == (TEST_SIZE, TEST_SIZE, 3)
    if "LoraLoader" in classes:
        assert "lora key not loaded" not in comfy.log_text() and "NOT LOADED" not in comfy.log_text()


def test_lora_workflow_appends_the_trigger_words_to_the_kosmosg_conditioning(comfy):
    """Its CLIP Text Encode (the LoRA's trigger words) reaches the picture through Conditioning (Concat): other words
    give another picture, and so does the graph without the two nodes; the CLIP it encodes with is the LoRA's
    (strength_clip 0 gives another picture), every LoRA key loaded."""
    prompt = shipped_workflow_with_tiny_models(comfy, REPO / "workflows" / "kosmosg-lora.json")
    (concat_id,) = [key for key, node in prompt.items() if node["class_type"] == "ConditioningConcat"]
    (save_id,) = [key for key, node in prompt.items() if node["class_type"] == "SaveImage"]
    results = []
    for variant in ("shipped", "other words", "no trigger words", "LoRA not on CLIP"):
        graph = copy.deepcopy(prompt)
        graph[save_id]["inputs"]["filename_prefix"] = f"kg-lora-{variant.replace(' ', '-')}"
        if variant == "other words":
            graph = substitute(graph, {("CLIPTextEncode", "text"): "oil painting, dramatic light"})
        if variant == "no trigger words":  # the sampler takes Kosmos-G's positive directly
            for node in graph.values():
                for name, value in node["inputs"].items():
                    if value == [concat_id, 0]:
                        node["inputs"][name] = graph[concat_id]["inputs"]["conditioning_to"]
            del graph[concat_id]
        if variant == "LoRA not on CLIP":
            graph = substitute(graph, {("LoraLoader", "strength_clip"): 0.0})
        entry = comfy.run(graph)
        assert_success(comfy, entry)
        results.append(pixels(comfy.output_images(entry)[0]))
    shipped, other_words, without, lora_not_on_clip = results
    assert (shipped != other_words).any() and (shipped != without).any() and (shipped != lora_not_on_clip).any()
    assert "lora key not loaded" not in comfy.log_text() and "NOT LOADED" not in comfy.log_text()


def shipped_workflow_with_tiny_models(comfy, workflow_path):
    """A shipped workflow as an API prompt, checked against the server's schema, on the session's tiny models
    (the SD1.5 checkpoint with CLIP where the graph encodes text with it) at 2 steps and 64 px."""
    info = comfy.object_info()
    workflow = json.loads(workflow_path.read_text())
    assert schema_problems(workflow, info) == []
    prompt = ui_to_api(workflow, info)
    uses_clip = any(node["class_type"] == "CLIPTextEncode" for node in prompt.values())
    return substitute(prompt, {
        ("CheckpointLoaderSimple", "ckpt_name"):
            comfy_tiny_models.CLIP_CHECKPOINT_NAME if uses_clip else comfy_tiny_models.UNET_NAME,
        ("KosmosGLoader", "checkpoint"): TINY_KOSMOSG,
        ("KosmosGCheckpointSD15", "checkpoint"): TINY_KOSMOSG_PT,  # the official file (it stores the networks)
        ("ControlNetLoader", "control_net_name"): comfy_tiny_models.CONTROLNET_NAME,
        ("LoraLoader", "lora_name"): comfy_tiny_models.LORA_NAME,
        ("KSampler", "steps"): TEST_STEPS,
        ("KosmosGOfficialSampler", "steps"): TEST_STEPS,
        ("EmptyLatentImage", "width"): TEST_SIZE,
        ("EmptyLatentImage", "height"): TEST_SIZE,
        ("EmptyLatentImage", "batch_size"): 1,
    })


def test_same_seed_gives_same_image(comfy):
    runs = []
    for seed in (7, 8, 7):  # the middle run evicts the cached sampler output, so the third one recomputes
        entry = comfy.run(add_sampling(encode_graph(), seed=seed, prefix="kg-seed"))
        assert_success(comfy, entry)
        runs.append(comfy.output_images(entry)[0])
    assert runs[0] == runs[2]
    assert (pixels(runs[0]) != pixels(runs[1])).any()


def test_encode_keeps_its_disk_cache_in_the_internal_user_folder(comfy):
    """The Encode node's disk cache (on when an API prompt leaves disk_cache out) lands in ComfyUI's user folder as
    `__kosmosg_cache`, which the server's user-data endpoints never serve (it holds encodings of users' prompts)."""
    entry = comfy.run(add_sampling(encode_graph(text="a cached <i>"), prefix="kg-disk"))
    assert_success(comfy, entry)
    folder = comfy.data / "user" / "__kosmosg_cache"
    assert len(list(folder.glob("*/*.safetensors"))) >= 2  # at least this prompt's encoding and its image's features
    for path in ("/api/userdata?dir=__kosmosg_cache", "/api/userdata?dir=..%2F__kosmosg_cache",
                 "/api/userdata/..%2F__kosmosg_cache"):
        status, body = comfy.get(path)
        assert status in (400, 403, 404) or b"safetensors" not in body, (path, status, body[:300])


def test_the_disk_cache_survives_a_server_restart(comfy):
    """The user's story: a workflow run, ComfyUI restarted, the same workflow again: Kosmos-G Encode reads its
    encodings from the disk cache (the model is not run) and the picture is the same."""
    graph = add_sampling(encode_graph(text="a restart-proof <i>"), prefix="kg-restart")
    before = comfy.run(graph)
    assert_success(comfy, before)
    comfy.stop()
    try:
        comfy.port = free_port()  # the old one may linger in TIME_WAIT
        comfy.start()  # its log_text is this run's only
    finally:
        if comfy.proc is None:  # the other tests share this server: up again whatever happened
            comfy.port = free_port()
            comfy.start()
    after = comfy.run(graph)
    assert_success(comfy, after)
    assert "Kosmos-G Encode: read from the disk cache" in comfy.log_text(), comfy.log_tail()
    # the weights are not read either (a review found ComfyUI's executor read them, looking up the Loader output's
    # `patcher` for its model tracker)
    assert "reading the weights of" not in comfy.log_text(), comfy.log_tail()
    assert (pixels(comfy.output_images(after)[0]) == pixels(comfy.output_images(before)[0])).all()


def test_conditioning_through_stock_nodes(comfy):
    graph = encode_graph(text="<i> and <i> together", images=("kosmosg_subject_1.png", "kosmosg_subject_2.png"),
                         weights="1.0, 0.7")
    graph.update({
        "5": {"class_type": "KosmosGInterleavedPrompt", "inputs": {"text": "a red apple", "weights": ""}},
        "6": {"class_type": "KosmosGEncode", "inputs": {"model": ["2", 0], "prompt": ["5", 0]}},
        "30": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["4", 0], "conditioning_2": ["6", 0]}},
        "31": {"class_type": "ConditioningAverage", "inputs": {
            "conditioning_to": ["30", 0], "conditioning_from": ["6", 0], "conditioning_to_strength": 0.6}},
        "32": {"class_type": "ConditioningConcat", "inputs": {"conditioning_to": ["31", 0], "conditioning_from": ["6", 0]}},
        "33": {"class_type": "ConditioningSetArea", "inputs": {
            "conditioning": ["6", 0], "width": 64, "height": 64, "x": 0, "y": 0, "strength": 1.0}},
        "34": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": TEST_SIZE, "height": TEST_SIZE}},
        "35": {"class_type": "ConditioningSetMask", "inputs": {
            "conditioning": ["4", 0], "mask": ["34", 0], "strength": 1.0, "set_cond_area": "default"}},
        "36": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["32", 0], "conditioning_2": ["33", 0]}},
        "37": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["36", 0], "conditioning_2": ["35", 0]}},
        "38": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["4", 1]}},
        # scheduled: the subject for the first 60 % of the steps, the text prompt after
        "39": {"class_type": "ConditioningSetTimestepRange", "inputs": {"conditioning": ["37", 0], "start": 0.0, "end": 0.6}},
        "40": {"class_type": "ConditioningSetTimestepRange", "inputs": {"conditioning": ["6", 0], "start": 0.6, "end": 1.0}},
        "41": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["39", 0], "conditioning_2": ["40", 0]}},
    })
    entry = comfy.run(add_sampling(graph, positive=("41", 0), negative=("38", 0), batch=2, prefix="kg-cond"))
    assert_success(comfy, entry)
    assert len(comfy.output_images(entry)) == 2
    unscheduled = comfy.run(add_sampling(graph, positive=("37", 0), negative=("38", 0), batch=2, prefix="kg-cond-all"))
    assert_success(comfy, unscheduled)
    assert (pixels(comfy.output_images(entry)[0]) != pixels(comfy.output_images(unscheduled)[0])).any()


def test_official_sampler_drives_sampler_custom(comfy):
    """Kosmos-G Official Sampler's SAMPLER + SIGMAS in SamplerCustom on a loaded SD1.5 checkpoint's MODEL (whose
    noise schedule it reads), and in SamplerCustomAdvanced (the same picture); KSampler's dpmpp_2m + normal from the same seed gives a different picture
    (tests/test_nodes_unit.py proves the node's path is the official one)."""
    graph = add_sampling(encode_graph(), prefix="kg-official")
    graph.update({
        "30": {"class_type": "KosmosGOfficialSampler", "inputs": {"model": ["1", 0], "steps": TEST_STEPS}},
        "31": {"class_type": "SamplerCustom", "inputs": {
            "model": ["1", 0], "add_noise": True, "noise_seed": 42, "cfg": 6.0, "positive": ["4", 0],
            "negative": ["4", 1], "sampler": ["30", 0], "sigmas": ["30", 1], "latent_image": ["20", 0]}},
    })
    graph["22"]["inputs"]["samples"] = ["31", 0]
    del graph["21"]
    entry = comfy.run(graph)
    assert_success(comfy, entry)
    official = pixels(comfy.output_images(entry)[0])
    assert official.shape == (TEST_SIZE, TEST_SIZE, 3)
    graph.update({  # the same through SamplerCustomAdvanced: guider and noise as nodes of their own
        "32": {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["4", 0], "negative": ["4", 1],
                                                     "cfg": 6.0}},
        "33": {"class_type": "RandomNoise", "inputs": {"noise_seed": 42}},
        "34": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["33", 0], "guider": ["32", 0], "sampler": ["30", 0], "sigmas": ["30", 1],
            "latent_image": ["20", 0]}},
    })
    graph["22"]["inputs"]["samples"] = ["34", 0]
    graph["23"]["inputs"]["filename_prefix"] = "kg-official-advanced"
    del graph["31"]
    advanced = comfy.run(graph)
    assert_success(comfy, advanced)
    assert (pixels(comfy.output_images(advanced)[0]) == official).all()
    # Kosmos-G Official Noise in float32 on the CPU draws what RandomNoise draws there
    graph["33"] = {"class_type": "KosmosGOfficialNoise", "inputs": {"noise_seed": 42, "dtype": "fp32"}}
    graph["23"]["inputs"]["filename_prefix"] = "kg-official-noise"
    official_noise = comfy.run(graph)
    assert_success(comfy, official_noise)
    assert (pixels(comfy.output_images(official_noise)[0]) == official).all()
    graph["33"]["inputs"]["dtype"] = "fp16"  # the demo's (drawn on the CPU here: not the demo's numbers)
    graph["23"]["inputs"]["filename_prefix"] = "kg-official-noise-fp16"
    half = comfy.run(graph)
    assert_success(comfy, half)
    assert pixels(comfy.output_images(half)[0]).shape == (TEST_SIZE, TEST_SIZE, 3)
    ksampler = comfy.run(add_sampling(encode_graph(), seed=42, prefix="kg-official-ksampler"))
    assert_success(comfy, ksampler)
    assert (pixels(comfy.output_images(ksampler)[0]) != official).any()
    graph["30"]["inputs"]["scheduler"] = "ddim"  # the demo's DDIM (an API prompt without it: dpm, above)
    graph["23"]["inputs"]["filename_prefix"] = "kg-official-ddim"
    ddim = comfy.run(graph)
    assert_success(comfy, ddim)
    assert (pixels(comfy.output_images(ddim)[0]) != pixels(comfy.output_images(half)[0])).any()
    graph["30"]["inputs"]["scheduler"] = "pndm"  # the demo's third
    graph["23"]["inputs"]["filename_prefix"] = "kg-official-pndm"
    pndm = comfy.run(graph)
    assert_success(comfy, pndm)
    assert (pixels(comfy.output_images(pndm)[0]) != pixels(comfy.output_images(ddim)[0])).any()


def test_ksampler_advanced_with_basic_controlnet_apply(comfy):
    """The other stock consumers: KSamplerAdvanced, and the (non-advanced) ControlNetApply that
    only patches the positive conditioning."""
    graph = add_sampling(encode_graph(), prefix="kg-advanced")
    graph.update({
        "50": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": comfy_tiny_models.CONTROLNET_NAME}},
        "51": {"class_type": "EmptyImage", "inputs": {"width": TEST_SIZE, "height": TEST_SIZE, "batch_size": 1,
                                                      "color": 0}},
        "52": {"class_type": "ControlNetApply", "inputs": {"conditioning": ["4", 0], "control_net": ["50", 0],
                                                           "image": ["51", 0], "strength": 0.8}},
        "21": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["1", 0], "positive": ["52", 0], "negative": ["4", 1], "latent_image": ["20", 0],
            "add_noise": "enable", "noise_seed": 5, "steps": TEST_STEPS, "cfg": 6.0, "sampler_name": "euler",
            "scheduler": "normal", "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable"}},
    })
    entry = comfy.run(graph)
    assert_success(comfy, entry)
    assert pixels(comfy.output_images(entry)[0]).shape == (TEST_SIZE, TEST_SIZE, 3)


def test_image_batch_on_one_socket_gives_one_conditioning_per_sample(comfy):
    graph = encode_graph(images=())
    graph["3"]["inputs"]["text"] = "a photo of <i>"
    graph["10"] = {"class_type": "LoadImage", "inputs": {"image": "kosmosg_subject_1.png"}}
    graph["11"] = {"class_type": "LoadImage", "inputs": {"image": "kosmosg_subject_2.png"}}
    graph["12"] = {"class_type": "ImageBatch", "inputs": {"image1": ["10", 0], "image2": ["11", 0]}}
    graph["3"]["inputs"]["images.image0"] = ["12", 0]
    graph["13"] = {"class_type": "KosmosGSaveConditioning", "inputs": {"conditioning": ["4", 0],
                                                                       "filename_prefix": "kg-batch"}}
    entry = comfy.run(add_sampling(graph, batch=2, prefix="kg-batch"))
    assert_success(comfy, entry)
    assert len(comfy.output_images(entry)) == 2
    from safetensors.torch import load_file

    saved = next((comfy.data / "models" / "kosmosg_conditioning").glob("kg-batch_*.safetensors"))
    cond = load_file(str(saved))["entry0.cond"]
    assert tuple(cond.shape) == (2, 77, 768)
    assert not cond[0].equal(cond[1])  # sample 0 saw subject 1, sample 1 subject 2


def test_save_then_load_conditioning_reproduces_the_image(comfy):
    direct = add_sampling(encode_graph(text="<i> in the snow"), seed=3, prefix="kg-direct")
    direct["40"] = {"class_type": "KosmosGSaveConditioning", "inputs": {"conditioning": ["4", 0],
                                                                        "filename_prefix": "kg-snow"}}
    entry = comfy.run(direct)
    assert_success(comfy, entry)
    name = entry["outputs"]["40"]["text"][0].removeprefix("Saved ")
    assert (comfy.data / "models" / "kosmosg_conditioning" / name).is_file()
    direct_png = [img for img in comfy.output_images(entry)][0]

    loaded = {k: v for k, v in direct.items() if k not in ("3", "10", "40")}
    loaded["4"] = {"class_type": "KosmosGEncode", "inputs": {"model": ["2", 0], "prompt": ["5", 0]}}
    loaded["5"] = {"class_type": "KosmosGInterleavedPrompt", "inputs": {"text": "", "weights": ""}}  # negative only
    loaded["41"] = {"class_type": "KosmosGLoadConditioning", "inputs": {"conditioning_file": name}}
    loaded["21"]["inputs"]["positive"] = ["41", 0]
    loaded["23"]["inputs"]["filename_prefix"] = "kg-loaded"
    entry = comfy.run(loaded)
    assert_success(comfy, entry)
    assert (pixels(comfy.output_images(entry)[0]) == pixels(direct_png)).all()


def test_placeholder_mismatch_is_rejected_before_running(comfy):
    graph = add_sampling(encode_graph(text="<i> and <i> and <i> on a sofa",
                                      images=("kosmosg_subject_1.png", "kosmosg_subject_2.png")), prefix="kg-bad")
    status, body = comfy.queue(graph)
    assert status == 400
    errors = body["node_errors"]["3"]["errors"]
    # ComfyUI repeats the message once per argument the validator takes (a review saw one per image socket): twice,
    # under text (the input at fault) and input_types, whatever the number of images
    assert [e["details"].split(" - ")[0] for e in errors] == ["text", "input_types"], errors
    assert "3 <i> placeholder(s)" in errors[0]["details"] and "2 image(s)" in errors[0]["details"]
    # a value typed where an image link belongs: one message, at queue time, whatever the text says
    for prompt_text in ("<i>", "no image"):
        graph = add_sampling(encode_graph(text=prompt_text, images=()), prefix="kg-literal")
        graph["3"]["inputs"]["images.image0"] = "kosmosg_subject_1.png"
        status, body = comfy.queue(graph)
        assert status == 400 and "images.image0: not linked to an image" in json.dumps(body["node_errors"]["3"]), body
    graph = add_sampling(encode_graph(text="<i> and <i>", images=("kosmosg_subject_1.png", "kosmosg_subject_2.png")),
                         prefix="kg-past")
    graph["3"]["inputs"]["images.image16"] = graph["3"]["inputs"].pop("images.image1")  # a socket the node lacks
    status, body = comfy.queue(graph)  # ComfyUI leaves it out: counted as missing
    assert status == 400 and "2 <i> placeholder(s) but 1 image(s)" in json.dumps(body), body
    # the server keeps serving
    assert_success(comfy, comfy.run(add_sampling(encode_graph(), seed=11, prefix="kg-after-bad")))


def test_weight_count_mismatch_stops_the_prompt_node(comfy):
    entry = comfy.run(add_sampling(encode_graph(weights="1.0, 0.5"), prefix="kg-badw"))
    assert entry["status"]["status_str"] == "error"
    err = execution_error(entry)
    assert err["node_type"] == "KosmosGInterleavedPrompt"
    assert "weights has 2 value(s) but 1 image(s)" in err["exception_message"], err["exception_message"]


def test_a_weight_written_in_the_text_runs_as_the_weights_list(comfy):
    written = comfy.run(add_sampling(encode_graph(text="a photo of <i:0.3> on the beach"), seed=5, prefix="kg-written"))
    listed = comfy.run(add_sampling(encode_graph(weights="0.3"), seed=5, prefix="kg-listed"))
    plain = comfy.run(add_sampling(encode_graph(), seed=5, prefix="kg-plain"))
    for entry in (written, listed, plain):
        assert_success(comfy, entry)
    written, listed, plain = (pixels(comfy.output_images(e)[0]) for e in (written, listed, plain))
    assert (written == listed).all() and (written != plain).any()
    status, body = comfy.queue(add_sampling(encode_graph(text="a photo of <i:O.3>"), prefix="kg-bad-written"))
    assert status == 400
    assert "Placeholder 1 of the prompt, '<i:O.3>', has no weight" in json.dumps(body["node_errors"]["3"])


def test_missing_model_file_names_the_folder(comfy):
    status, body = comfy.queue(add_sampling(encode_graph(kosmosg="not-there.safetensors"), prefix="kg-missing"))
    assert status == 400
    details = json.dumps(body["node_errors"]["2"])
    assert "not-there.safetensors" in details
    assert str(comfy.data / "models" / "kosmosg") in details
    assert "models/kosmosg" in details


def test_broken_checkpoint_reports_execution_error_and_server_survives(comfy):
    (comfy.data / "models" / "kosmosg" / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00not a safetensors")
    entry = comfy.run(add_sampling(encode_graph(kosmosg="broken.safetensors"), prefix="kg-broken"))
    assert entry["status"]["status_str"] == "error"
    err = execution_error(entry)
    assert err["node_type"] == "KosmosGLoader"
    assert "broken.safetensors" in err["exception_message"]
    assert_success(comfy, comfy.run(add_sampling(encode_graph(), seed=12, prefix="kg-after-broken")))
