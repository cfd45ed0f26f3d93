"""Unit tests of each node class, run against ComfyUI's real modules (comfy_api, folder_paths,
comfy.model_management, comfy.model_patcher, comfy.utils) without starting a server.

The pack is imported as a package under a chosen name (`kosmosg_pack`), never as top-level
`nodes` (ComfyUI has its own). The ComfyUI tree comes from .ci/setup_env.sh.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

from support.comfy_modules import import_comfy

REPO = Path(__file__).resolve().parents[1]
comfy = import_comfy()
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402


def _import_pack(name: str = "kosmosg_pack"):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


pack = _import_pack()
from kosmosg_pack.kosmosg_core.cpu_linear import has_packed_linears, packs_dtype  # noqa: E402  (the pack's own classes)
from kosmosg_pack.kosmosg_core.pipeline import KosmosGPipeline, UnreadWeights  # noqa: E402
from kosmosg_pack.kosmosg_core.errors import CheckpointError, CheckpointNotFoundError, ImageError, PromptError, TokenizerError  # noqa: E402
from kosmosg_pack.nodes import NODES, comfy_entrypoint  # noqa: E402
from kosmosg_pack.nodes import disk_cache, encode, model_management, paths  # noqa: E402
from kosmosg_pack.nodes.conditioning_files import KosmosGLoadConditioning, KosmosGSaveConditioning  # noqa: E402
from kosmosg_pack.nodes.encode import KosmosGEncode  # noqa: E402
from kosmosg_pack.nodes.loader import KosmosGConvertCheckpoint, KosmosGLoader, converted_file_name  # noqa: E402
from kosmosg_pack.nodes.prompt import KosmosGInterleavedPrompt, parse_weights  # noqa: E402
from kosmosg_pack.nodes.sampling import KosmosGOfficialNoise, KosmosGOfficialSampler  # noqa: E402
from kosmosg_pack.nodes.types import KosmosGPrompt  # noqa: E402

EXPECTED_NODES = {
    "KosmosGLoader": "Kosmos-G Loader",
    "KosmosGInterleavedPrompt": "Kosmos-G Interleaved Prompt",
    "KosmosGEncode": "Kosmos-G Encode",
    "KosmosGSaveConditioning": "Kosmos-G Save Conditioning",
    "KosmosGLoadConditioning": "Kosmos-G Load Conditioning",
    "KosmosGConvertCheckpoint": "Kosmos-G Convert Checkpoint",
    "KosmosGOfficialSampler": "Kosmos-G Official Sampler",
    "KosmosGOfficialNoise": "Kosmos-G Official Noise",
    "KosmosGCheckpointSD15": "Kosmos-G SD1.5 From Checkpoint",
}


# --- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def user_directory(tmp_path, monkeypatch):
    """ComfyUI's user folder in tmp: Kosmos-G Encode's disk cache lives there (never shared between tests)."""
    folder = tmp_path / "comfy-user"
    monkeypatch.setattr(folder_paths, "user_directory", str(folder))
    return folder


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    """A tiny official-format checkpoint (768-wide output), its tokenizer in data/ beside it and a
    sidecar tiny.json with the head counts."""
    from support.tiny_kosmosg import write_tiny_official

    root = tmp_path_factory.mktemp("official")
    write_tiny_official(root, context_dim=768, seed=0, name="tiny.pt")
    return root


@pytest.fixture()
def model_dirs(tmp_path, official_files, monkeypatch):
    """models/kosmosg and models/kosmosg_conditioning in tmp, registered like the pack does at import."""
    import shutil

    kosmosg_dir, cond_dir = tmp_path / "kosmosg", tmp_path / "kosmosg_conditioning"
    shutil.copytree(official_files, kosmosg_dir)
    cond_dir.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "kosmosg", ([str(kosmosg_dir)], paths.CHECKPOINT_EXTENSIONS))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "kosmosg_conditioning",
                        ([str(cond_dir)], paths.CONDITIONING_EXTENSIONS))
    folder_paths.filename_list_cache.clear()
    model_management.clear_cache()
    yield kosmosg_dir, cond_dir
    folder_paths.filename_list_cache.clear()
    model_management.clear_cache()


@pytest.fixture()
def converted(model_dirs):
    out = KosmosGConvertCheckpoint.execute("tiny.pt", output_name="tiny-conv", dtype="fp32")
    folder_paths.filename_list_cache.clear()
    return out.result[0]


def image(seed: int, batch: int = 1, size: int = 40, channels: int = 3) -> torch.Tensor:
    return torch.rand(batch, size, size, channels, generator=torch.Generator().manual_seed(seed))  # [B, H, W, C]


def run_prompt(text, images=(), weights=""):
    return KosmosGInterleavedPrompt.execute(text, {f"image{i}": img for i, img in enumerate(images)}, weights).result[0]


# --- registration and schema -----------------------------------------------------------------------
def test_entrypoint_registers_every_node_with_stable_ids():
    extension = asyncio.run(comfy_entrypoint())
    nodes = asyncio.run(extension.get_node_list())
    schemas = {node.define_schema().node_id: node.define_schema() for node in nodes}
    assert {k: s.display_name for k, s in schemas.items()} == EXPECTED_NODES
    assert pack.WEB_DIRECTORY == "./web/js"


@pytest.mark.parametrize("node", NODES, ids=lambda n: n.__name__)
def test_schema_has_category_description_and_tooltips(node):
    node.GET_SCHEMA()  # ComfyUI's own schema validation
    schema = node.define_schema()
    assert schema.category == "Kosmos-G"
    assert len(schema.description) > 40
    assert all(inp.tooltip for inp in schema.inputs), [i.id for i in schema.inputs if not i.tooltip]
    assert all(out.tooltip for out in schema.outputs)


def test_custom_types_and_conditioning_outputs():
    info = KosmosGEncode.GET_NODE_INFO_V1()
    assert info["input"]["required"]["model"][0] == "KOSMOSG_MODEL"
    assert info["input"]["required"]["prompt"][0] == "KOSMOSG_PROMPT"
    assert info["output"] == ["CONDITIONING", "CONDITIONING"]
    assert info["output_name"] == ["positive", "negative"]
    assert KosmosGLoader.GET_NODE_INFO_V1()["output"] == ["KOSMOSG_MODEL"]


def test_folder_registration_keeps_yaml_paths(monkeypatch):
    """A `kosmosg:` key in extra_model_paths.yaml adds its folders to models/kosmosg (a review found that it replaced
    it: the start script's yaml hid DATA/models/kosmosg, where the README and the "not found" message send users)."""
    default = os.path.join(folder_paths.models_dir, "kosmosg")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "kosmosg", (["/from/yaml"], set()))
    paths.register_folder("kosmosg", paths.CHECKPOINT_EXTENSIONS)
    assert folder_paths.folder_names_and_paths["kosmosg"] == ([default, "/from/yaml"], {".pt", ".safetensors"})
    paths.register_folder("kosmosg", paths.CHECKPOINT_EXTENSIONS)  # again (a reload): no duplicate
    assert folder_paths.folder_names_and_paths["kosmosg"][0] == [default, "/from/yaml"]
    monkeypatch.delitem(folder_paths.folder_names_and_paths, "kosmosg")
    paths.register_folder("kosmosg", paths.CHECKPOINT_EXTENSIONS)
    assert folder_paths.folder_names_and_paths["kosmosg"][0] == [os.path.join(folder_paths.models_dir, "kosmosg")]


# --- loader ----------------------------------------------------------------------------------------
def test_loader_lists_checkpoints_and_reports_missing_file(model_dirs):
    kosmosg_dir, _ = model_dirs
    options = KosmosGLoader.define_schema().inputs[0].options
    assert options == ["tiny.pt"]  # tokenizer files beside it are not listed
    message = KosmosGLoader.validate_inputs("missing.safetensors")
    assert isinstance(message, str)
    assert "missing.safetensors" in message and str(kosmosg_dir) in message and "tiny.pt" in message
    assert "models/kosmosg" in message and "extra_model_paths.yaml" in message
    assert KosmosGLoader.validate_inputs("tiny.pt") is True
    with pytest.raises(CheckpointNotFoundError, match="missing.safetensors"):
        KosmosGLoader.execute("missing.safetensors")


def test_file_names_no_file_system_can_hold_are_named(model_dirs):
    """An API prompt's file name over 255 bytes: "not found" said why (ComfyUI's lookup just finds nothing)."""
    name = "c" * 300 + ".safetensors"
    reason = r"' was not found: the name is longer than the file system allows \(312 bytes, limit 255\)\. Searched"
    for validate in (KosmosGLoader.validate_inputs, KosmosGLoadConditioning.validate_inputs):
        assert re.search(reason, validate(name))
    for execute in (KosmosGLoader.execute, KosmosGConvertCheckpoint.execute):
        with pytest.raises(CheckpointNotFoundError, match=reason):
            execute(name)


def test_loader_wraps_model_in_patcher_and_caches_by_file(model_dirs, converted):
    kosmosg_dir, _ = model_dirs
    model = KosmosGLoader.execute(converted, dtype="auto", device="cpu").result[0]
    assert not model.pipeline.is_loaded  # the file checked, its config and tokenizer read; the weights on first use
    # found by a review: ComfyUI's executor reads `patcher` of every output it passes on (its model tracker): that
    # read the weights even when every encoding then came from the disk cache
    comfy.model_patcher.PromptModelTracker().add([model])
    assert comfy.model_patcher.is_model_patcher_output(model) is False
    assert model.patcher is None and not model.pipeline.is_loaded
    assert isinstance(model.loaded_patcher(), comfy.model_patcher.ModelPatcher) and model.pipeline.is_loaded
    assert model.patcher is model.loaded_patcher()
    assert model.patcher.model is model.pipeline.model
    assert model.patcher.load_device == torch.device("cpu")
    assert model.pipeline.dtype == torch.float32  # auto on the CPU
    assert model.context_dim == 768
    assert KosmosGLoader.execute(converted, dtype="auto", device="cpu").result[0] is model
    bf16 = KosmosGLoader.execute(converted, dtype="bf16", device="cpu").result[0]
    assert bf16.pipeline.dtype == torch.bfloat16
    # on a CPU load device, fp32 (and bf16 where the CPU has native bf16) get packed linear layers;
    # the patcher still counts every weight
    assert has_packed_linears(model.pipeline.model)
    assert has_packed_linears(bf16.pipeline.model) == packs_dtype(torch.bfloat16)
    plain = KosmosGPipeline.from_checkpoint(kosmosg_dir / converted, pack_cpu_linears=False).model
    fp32_bytes = sum(t.numel() * t.element_size() for t in plain.state_dict().values())
    assert model.patcher.model_size() == fp32_bytes and bf16.loaded_patcher().model_size() == fp32_bytes // 2
    before = KosmosGLoader.fingerprint_inputs(converted, "auto", "cpu")
    path = kosmosg_dir / converted
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert KosmosGLoader.fingerprint_inputs(converted, "auto", "cpu") != before
    assert KosmosGLoader.execute(converted, dtype="auto", device="cpu").result[0] is not model


def test_loader_opens_again_when_the_tokenizer_or_config_beside_an_official_file_changes(model_dirs, converted):
    """Found by a review: replacing dict.txt beside an official .pt kept the old tokenizer (the fingerprint and the
    shared-model key looked at the .pt alone). A converted file holds its tokenizer: the files beside it do not
    matter."""
    kosmosg_dir, _ = model_dirs
    official = KosmosGLoader.execute("tiny.pt", dtype="fp32", device="cpu").result[0]
    before = KosmosGLoader.fingerprint_inputs("tiny.pt", "fp32", "cpu")
    converted_before = KosmosGLoader.fingerprint_inputs(converted, "fp32", "cpu")
    dict_txt = next(kosmosg_dir.rglob("dict.txt"))
    lines = dict_txt.read_text().splitlines(keepends=True)
    dict_txt.write_text("".join([lines[1], lines[0], *lines[2:]]))  # two words swap ids
    os.utime(dict_txt, ns=(dict_txt.stat().st_atime_ns, dict_txt.stat().st_mtime_ns + 10**9))
    assert KosmosGLoader.fingerprint_inputs("tiny.pt", "fp32", "cpu") != before
    assert KosmosGLoader.fingerprint_inputs(converted, "fp32", "cpu") == converted_before
    reopened = KosmosGLoader.execute("tiny.pt", dtype="fp32", device="cpu").result[0]
    text = "a photo of a cat in the sand"
    assert reopened is not official
    assert reopened.pipeline.tokenizer.encode(text) != official.pipeline.tokenizer.encode(text)
    sidecar = kosmosg_dir / "tiny.json"
    before = KosmosGLoader.fingerprint_inputs("tiny.pt", "fp32", "cpu")
    os.utime(sidecar, ns=(sidecar.stat().st_atime_ns, sidecar.stat().st_mtime_ns + 10**9))
    assert KosmosGLoader.fingerprint_inputs("tiny.pt", "fp32", "cpu") != before


def test_loader_works_on_a_comfyui_without_core_model_patcher(model_dirs, converted, monkeypatch):
    """ComfyUI releases from before CoreModelPatcher (early 2026) but with the V3 node API: plain ModelPatcher."""
    monkeypatch.delattr(comfy.model_patcher, "CoreModelPatcher")
    model = KosmosGLoader.execute(converted, dtype="fp32", device="cpu").result[0]
    assert type(model.loaded_patcher()) is comfy.model_patcher.ModelPatcher
    assert KosmosGEncode.execute(model, run_prompt("a <i> in town", [image(3)])).result[0][0][0].shape == (1, 77, 768)


def test_loaded_model_is_freed_when_comfy_lets_go_of_it(model_dirs, converted):
    """No model kept alive behind ComfyUI's back: once its node cache drops the Loader's output and the memory
    manager has unloaded it (what "free model and node cache" does), the weights are garbage."""
    import gc
    import weakref

    model = KosmosGLoader.execute(converted, dtype="fp32", device="cpu").result[0]
    KosmosGEncode.execute(model, run_prompt("a <i> in town", [image(3)]))  # through load_models_gpu
    assert any(m.model is model.patcher for m in mm.current_loaded_models)
    alive = weakref.ref(model.pipeline.model)
    assert len(model.encodings) == 1  # Encode's results live with the model (a review found them outliving it)
    mm.unload_all_models()
    del model
    gc.collect()
    assert alive() is None
    again = KosmosGLoader.execute(converted, dtype="fp32", device="cpu").result[0]  # loads afresh, works
    assert KosmosGEncode.execute(again, run_prompt("a <i> in town", [image(3)])).result[0][0][0].shape == (1, 77, 768)


def test_loader_auto_device_follows_comfy_text_encoder_device(model_dirs, converted):
    model = KosmosGLoader.execute(converted).result[0]
    assert model.loaded_patcher().load_device == mm.text_encoder_device()
    assert model.patcher.offload_device == mm.text_encoder_offload_device()


def test_gpu_device_under_novram_computes_on_the_cpu_and_says_so(monkeypatch, caplog):
    """Found by a review: under --novram ComfyUI left the weights on the CPU (it streams them, which plain torch
    layers cannot), so device=gpu encoded on the CPU in the GPU's dtype while the caches' keys said cuda."""
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(mm, "get_torch_device", lambda: gpu)
    monkeypatch.setattr(mm, "text_encoder_offload_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NORMAL_VRAM)
    assert model_management.resolve_devices("gpu") == (gpu, torch.device("cpu"))
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NO_VRAM)
    with caplog.at_level("WARNING"):
        load, offload = model_management.resolve_devices("gpu")
    assert load == offload == torch.device("cpu")
    assert model_management.choose_dtype("auto", load) == torch.float32
    assert "device=gpu under --novram: the model computes on the CPU" in caplog.text


def test_loader_offers_each_gpu_by_name_where_there_are_several(monkeypatch):
    """Users ask for a second-device option: with two GPUs the encoder can have one of its own."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(mm, "get_torch_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(mm, "text_encoder_offload_device", lambda: cpu)
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NORMAL_VRAM)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert model_management.device_choices() == ["auto", "cpu", "gpu"]  # one GPU: 'gpu' is it
    with pytest.raises(ValueError, match=r"device 'cuda:1': this machine's PyTorch sees no such GPU; choose one of "
                                         r"\['auto', 'cpu', 'gpu'\] in the Kosmos-G Loader"):
        model_management.resolve_devices("cuda:1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert model_management.device_choices() == ["auto", "cpu", "gpu", "cuda:0", "cuda:1"]
    device_input = next(i for i in KosmosGLoader.define_schema().inputs if i.id == "device")
    assert device_input.options == ["auto", "cpu", "gpu", "cuda:0", "cuda:1"] and device_input.default == "auto"
    assert model_management.resolve_devices("cuda:1") == (torch.device("cuda", 1), cpu)
    monkeypatch.setattr(mm, "text_encoder_offload_device", lambda: torch.device("cuda", 0))  # --gpu-only
    assert model_management.resolve_devices("cuda:1") == (torch.device("cuda", 1), torch.device("cuda", 1))
    assert model_management.resolve_devices("gpu") == (torch.device("cuda", 0), torch.device("cuda", 0))
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NO_VRAM)  # as device=gpu: the CPU computes
    assert model_management.resolve_devices("cuda:1") == (cpu, cpu)
    with pytest.raises(ValueError, match="device must be one of"):
        model_management.resolve_devices("cuda")


def test_loader_without_tokenizer_says_where_to_put_it(model_dirs, tmp_path):
    import shutil

    kosmosg_dir, _ = model_dirs
    shutil.move(kosmosg_dir / "data", tmp_path / "elsewhere")
    with pytest.raises(TokenizerError, match="sentencepiece.bpe.model") as err:
        KosmosGLoader.execute("tiny.pt")
    for place in ("tiny", "tiny-tokenizer", "tokenizer", "data"):  # every folder searched is named
        assert f"{kosmosg_dir / place}," in str(err.value)
    shutil.move(tmp_path / "elsewhere", kosmosg_dir / "tiny-tokenizer")  # one of them: found
    assert KosmosGLoader.execute("tiny.pt").result[0] is not None


# --- interleaved prompt ----------------------------------------------------------------------------
def validate_prompt(text, input_types, images=None):
    """KosmosGInterleavedPrompt.validate_inputs as ComfyUI calls it: `images` holds None for each socket the prompt
    fills (linked or not: by default the linked ones), `input_types` the linked inputs' types."""
    if images is None:
        images = {name.split(".", 1)[1]: None for name in input_types if name.startswith("images.")}
    return KosmosGInterleavedPrompt.validate_inputs(text=text, input_types=input_types, images=images)


def test_prompt_validation_names_both_counts():
    message = validate_prompt("<i> and <i>", {"images.image0": "IMAGE"})
    assert "2 <i> placeholder(s)" in message and "1 image(s)" in message
    assert validate_prompt("<i> and <i>", {"images.image0": "IMAGE", "images.image1": "IMAGE"}) is True
    assert validate_prompt("no images", {}) is True
    assert "must be connected to an IMAGE" in validate_prompt("<i>", {"images.image0": "LATENT"})
    sixteen = {f"images.image{k}": "IMAGE" for k in range(16)}  # every socket: no image can be added
    assert "at most 16 images can be connected: remove 1 <i>" in validate_prompt("<i> " * 17, sixteen)
    assert validate_prompt(None, {"images.image0": "IMAGE"}) is True  # linked text
    # `<i:W>`: a placeholder with its weight, checked before the run
    two = {"images.image0": "IMAGE", "images.image1": "IMAGE"}
    assert validate_prompt("<i:0.5> and <i>", two) is True
    assert "2 <i> placeholder(s)" in validate_prompt("<i:0.5> and <i>", {})
    assert "Placeholder 2 of the prompt, '<i:x>', has no weight" in validate_prompt("<i> and <i:x>", two)
    assert "Image weight 11" in validate_prompt("<i> and <i:11>", two)
    # the weights list, alone and times the text's: when the node runs, before it reads a pixel
    images = {"image0": torch.rand(1, 8, 8, 3), "image1": torch.rand(1, 8, 8, 3)}
    with pytest.raises(PromptError, match=r"1 value\(s\) but 2 image\(s\)"):
        KosmosGInterleavedPrompt.execute("<i> <i>", images, weights="0.5")
    with pytest.raises(PromptError, match=r"Image weight 12 \(image 2: 6 written in the text x 2 given as its weight\)"):
        KosmosGInterleavedPrompt.execute("<i> and <i:6>", images, weights="1, 2")
    # declaring input_types turns off ComfyUI's link type check for text and weights too: redone by the node
    for name, kind in (("text", "INT"), ("weights", "FLOAT"), ("weights", "IMAGE")):
        message = validate_prompt(None, {name: kind, "images.image0": "IMAGE"})
        assert message == f"{name} must be connected to a STRING output, got {kind}.", message
    assert validate_prompt(None, {"text": "STRING", "weights": "*", "images.image0": "IMAGE"}) is True


def test_the_web_extension_mirrors_the_node_constants():
    """web/js/kosmosg_prompt.js repeats a few facts (it runs in the browser): they must not drift from Python's."""
    from kosmosg_pack.kosmosg_core import config
    from kosmosg_pack.nodes import prompt

    source = (REPO / "web" / "js" / "kosmosg_prompt.js").read_text(encoding="utf-8")
    constants = dict(re.findall(r"^const (\w+) = ([^;]+);", source, flags=re.M))
    assert json.loads(constants["PLACEHOLDER"]) == config.IMAGE_PLACEHOLDER
    assert float(constants["MAX_WEIGHT"]) == config.MAX_IMAGE_WEIGHT
    assert int(constants["MAX_IMAGES"]) == prompt.MAX_IMAGES
    assert json.loads(constants["NODE_ID"]) == KosmosGInterleavedPrompt.define_schema().node_id


def test_prompt_validation_takes_few_arguments():
    """ComfyUI repeats a validation message once per argument the function takes (a review saw 19 copies when it
    took **sockets): text and input_types only, whatever the number of images."""
    import inspect

    spec = inspect.getfullargspec(KosmosGInterleavedPrompt.validate_inputs)
    assert spec.varkw is None and spec.args == ["cls", "text", "input_types", "images"]


def test_prompt_validation_refuses_what_the_run_would_refuse_less_clearly():
    """Found by a review of API prompts: a value typed where an image link belongs was counted as an image by the
    run and not by the check (two errors giving opposite advice); a lone surrogate in the text failed only in
    Encode. The server test queues these."""
    message = validate_prompt("<i>", {}, images={"image0": None})  # a socket the prompt fills, not linked
    assert message == ("images.image0: not linked to an image (a value or null where a link belongs); connect it to "
                       "an IMAGE output (e.g. Load Image's) or leave it out."), message
    with pytest.raises(ImageError, match="image0: expected a ComfyUI IMAGE"):
        KosmosGInterleavedPrompt.execute("no image", {"image0": "kosmosg_subject_1.png"})
    # the channels the core reads (gray, gray + alpha: a review found them refused here), and a channels-first hint
    for channels in (1, 2):
        KosmosGInterleavedPrompt.execute("<i>", {"image0": torch.rand(1, 8, 8, channels)})
    with pytest.raises(ImageError, match=r"got \(1, 3, 8, 8\) \(channels first: x\.permute\(0, 2, 3, 1\) puts"):
        KosmosGInterleavedPrompt.execute("<i>", {"image0": torch.rand(1, 3, 8, 8)})
    assert "not valid text" in validate_prompt("a <i> \ud800", {"images.image0": "IMAGE"})
    # a socket the node lacks (an API prompt's image16): ComfyUI leaves it out of the check and hands it to the run,
    # as a keyword argument (a review found the run's bare TypeError)
    with pytest.raises(PromptError, match=r"images\.image16: the prompt node takes at most 16 images, in sockets "
                                          r"image0\.\.image15"):
        KosmosGInterleavedPrompt.execute("<i>", {"image0": torch.rand(1, 8, 8, 3)},
                                         **{"images.image16": torch.rand(1, 8, 8, 3)})


def test_parse_weights():
    assert parse_weights("", 2) == [1.0, 1.0]
    assert parse_weights("1.0, 0.8", 2) == [1.0, 0.8]
    with pytest.raises(PromptError, match="not a number"):
        parse_weights("1.0, abc", 2)
    with pytest.raises(PromptError, match=r"Image weight -1 \(weights\) is outside 0..10"):
        parse_weights("-1", 1)


def test_prompt_weights_are_optional_and_clip_syntax_is_flagged(caplog):
    """Found by a review: `weights` was documented as optional but an API prompt without it was refused
    ("Required input is missing: weights"); ComfyUI's CLIP syntax typed into the text was encoded silently as
    characters."""
    weights = next(i for i in KosmosGInterleavedPrompt.define_schema().inputs if i.id == "weights")
    assert weights.optional
    image = torch.rand(1, 8, 8, 3)
    assert KosmosGInterleavedPrompt.execute("a <i>", {"image0": image}).result[0].weights == [1.0]
    with caplog.at_level("WARNING"):
        KosmosGInterleavedPrompt.execute("a (photo:1.3) of <i>", {"image0": image})
    assert "'(photo:1.3)' is CLIP-text-encoder syntax" in caplog.text


def test_prompt_orders_sockets_numerically_and_drops_alpha():
    first, second = image(1), image(2, channels=4)
    value = KosmosGInterleavedPrompt.execute("<i> <i>", {"image10": second, "image2": first}, "1, 0.5").result[0]
    assert isinstance(value, KosmosGPrompt)
    assert torch.equal(value.images[0], first)
    assert torch.equal(value.images[1], second[..., :3])
    assert value.weights == [1.0, 0.5]


def test_prompt_batch_rules():
    value = run_prompt("<i> with <i>", [image(1, batch=3), image(2)])
    assert value.batch_size == 3
    assert torch.equal(value.images_for_sample(2)[0], value.images[0][2])
    assert torch.equal(value.images_for_sample(2)[1], value.images[1][0])  # single image shared
    with pytest.raises(ImageError, match="different sizes"):
        run_prompt("<i> <i>", [image(1, batch=2), image(2, batch=3)])
    with pytest.raises(PromptError, match="1 <i> placeholder"):
        run_prompt("<i>", [])
    with pytest.raises(ImageError, match="image1 holds an empty batch"):
        run_prompt("<i> <i>", [image(1), image(2, batch=3)[:0]])


def test_prompt_errors_name_the_socket_even_after_an_empty_one():
    """A socket left empty in the middle (image1) is skipped; an error about image2 named "image1" (the
    position among connected sockets), pointing the user at the empty socket."""
    images = {"image0": image(1), "image2": torch.rand(1, 40, 40)}  # a MASK on image2
    with pytest.raises(ImageError, match=r"^image2: expected a ComfyUI IMAGE"):
        KosmosGInterleavedPrompt.execute("<i> <i>", images, "")
    with pytest.raises(ImageError, match="image2 holds an empty batch"):
        KosmosGInterleavedPrompt.execute("<i> <i>", {"image0": image(1), "image2": image(2)[:0]}, "")
    with pytest.raises(ImageError, match=r"image0: 2, image2: 3"):
        KosmosGInterleavedPrompt.execute("<i> <i>", {"image0": image(1, batch=2), "image2": image(2, batch=3)}, "")


def _with_value(value, at=(0, 5, 7, 1)) -> torch.Tensor:
    bad = image(2, batch=2)
    bad[at] = value
    return bad


@pytest.mark.parametrize("bad, message", [
    (_with_value(float("nan")), r"Image tensor of shape \(2, 40, 40, 3\) contains NaN or infinity; fix the step that "
                                r"produced it \(in ComfyUI, the node feeding this image\)"),
    (_with_value(float("inf"), at=(1, 0, 0, 2)), "contains NaN or infinity; fix the step"),
    (_with_value(255.0), r"Float image tensor of shape \(2, 40, 40, 3\) holds values [\d.e+-]+\.\.255; float images "
                         r"must be 0\.\.1 \(divide 0\.\.255 images by 255"),
    (_with_value(-1.0), r"holds values -1\.\.[\d.]+; float images must be 0\.\.1 .*map -1\.\.1 images with \(x \+ 1\) / 2"),
    (torch.full((1, 8, 8, 3), 256, dtype=torch.int32), "holds values 256..256; integer images must be 0..255"),
])
def test_prompt_pixel_errors_name_the_socket(bad, message):
    """NaN / inf / out-of-range pixels were refused only in Encode, by the core, naming the shape alone: with
    several sockets the user could not tell which image was bad. Here the 2nd of two images, after an empty
    socket (image1)."""
    images = {"image0": image(1), "image1": None, "image2": bad}
    with pytest.raises(ImageError, match=rf"^image2: .*{message}"):
        KosmosGInterleavedPrompt.execute("<i> and <i>", images, "")
    assert KosmosGInterleavedPrompt.execute("<i> and <i>", {**images, "image2": image(2)}, "").result[0].batch_size == 1


def test_prompt_refuses_an_image_without_data():
    """A 'meta' tensor (shape only) passed the prompt node and failed in Encode with "Cannot copy out of
    meta tensor"; an image 0 pixels high or wide was a bare numpy ValueError in the pixel check."""
    with pytest.raises(ImageError, match="image0 holds no pixel data"):
        KosmosGInterleavedPrompt.execute("<i>", {"image0": torch.empty(1, 8, 8, 3, device="meta")}, "")
    for empty in (torch.zeros(1, 0, 0, 3), torch.zeros(1, 8, 0, 3)):
        with pytest.raises(ImageError, match=r"image0 holds images with no pixels \(shape \(1, "):
            KosmosGInterleavedPrompt.execute("<i>", {"image0": empty}, "")


def test_prompt_fingerprint_is_content_keyed():
    a = run_prompt("<i>", [image(1)])
    assert a.fingerprint() == run_prompt("<i>", [image(1)]).fingerprint()
    assert a.fingerprint() != run_prompt("<i>", [image(2)]).fingerprint()
    assert a.fingerprint() != run_prompt("<i>", [image(1)], "0.5").fingerprint()


# --- encode ----------------------------------------------------------------------------------------
def test_encode_outputs_standard_conditioning(model_dirs, converted):
    model = KosmosGLoader.execute(converted, device="cpu").result[0]
    prompt = run_prompt("a photo of <i> on the beach", [image(1)])
    positive, negative = KosmosGEncode.execute(model, prompt, "").result
    assert isinstance(positive, list) and len(positive) == 1
    cond, extras = positive[0]
    assert cond.shape == (1, 77, 768) and cond.dtype == torch.float32 and cond.device == mm.intermediate_device()
    assert torch.allclose(extras["pooled_output"], cond.mean(dim=1))
    assert extras["kosmosg"]["num_images"] == 1
    expected = model.pipeline.encode("a photo of <i> on the beach", [prompt.images[0][0]])
    assert torch.allclose(cond, expected.float(), atol=1e-6)
    assert torch.allclose(negative[0][0], model.pipeline.encode_unconditional("").float(), atol=1e-6)
    assert not torch.allclose(cond, negative[0][0])


def test_encode_batch_gives_one_conditioning_per_image(model_dirs, converted):
    model = KosmosGLoader.execute(converted, device="cpu").result[0]
    positive, negative = KosmosGEncode.execute(model, run_prompt("<i>", [image(3, batch=2)])).result
    assert positive[0][0].shape == (2, 77, 768) and negative[0][0].shape == (2, 77, 768)
    assert not torch.allclose(positive[0][0][0], positive[0][0][1])
    single = KosmosGEncode.execute(model, run_prompt("<i>", [image(3, batch=2)[1:]])).result[0]
    assert torch.allclose(positive[0][0][1], single[0][0][0], atol=1e-5)


def test_encode_weights_change_the_result(model_dirs, converted):
    model = KosmosGLoader.execute(converted, device="cpu").result[0]
    full = KosmosGEncode.execute(model, run_prompt("<i>", [image(4)], "1.0")).result[0][0][0]
    weak = KosmosGEncode.execute(model, run_prompt("<i>", [image(4)], "0.3")).result[0][0][0]
    assert not torch.allclose(full, weak)
    # in socket order: the n-th weight scales the n-th image
    two = run_prompt("<i> and <i>", [image(4), image(5)], "1.0, 0.5")
    got = KosmosGEncode.execute(model, two).result[0][0][0]
    images = [two.images[0][0], two.images[1][0]]
    assert torch.allclose(got, model.pipeline.encode("<i> and <i>", images, image_weights=[1.0, 0.5]).float(), atol=1e-6)
    assert not torch.allclose(got, model.pipeline.encode("<i> and <i>", images, image_weights=[0.5, 1.0]).float(),
                              atol=1e-4)


def test_a_weight_written_in_the_text_multiplies_the_weights_list(model_dirs, converted):
    model = KosmosGLoader.execute(converted, device="cpu").result[0]
    images = [image(4), image(5)]
    written = run_prompt("<i:0.5> and <i>", images, "2, 0.5")
    assert written.weights == [2.0, 0.5]  # the list, as given: the text's weights are applied when it is encoded
    positive = KosmosGEncode.execute(model, written).result[0]
    expected = model.pipeline.encode("<i> and <i>", [img[0] for img in images], image_weights=[1.0, 0.5])
    assert torch.allclose(positive[0][0], expected.float(), atol=1e-6)
    assert positive[0][1]["kosmosg"]["weights"] == [1.0, 0.5]  # what each image got, for Save Conditioning
    with pytest.raises(PromptError, match="Placeholder 1 of the prompt, '<i:>', has no weight"):
        run_prompt("<i:> and <i>", images)


def test_encode_cache_is_per_model(model_dirs, converted, monkeypatch):
    prompt = run_prompt("a photo of <i>", [image(4)])
    fp32 = KosmosGLoader.execute(converted, device="cpu", dtype="fp32").result[0]
    KosmosGEncode.execute(fp32, prompt)
    calls = []
    real = encode.encode_prompt
    monkeypatch.setattr(encode, "encode_prompt", lambda *a: calls.append(a) or real(*a))
    bf16 = KosmosGLoader.execute(converted, device="cpu", dtype="bf16").result[0]
    KosmosGEncode.execute(bf16, prompt)  # same prompt, another model: encoded again, by that model
    assert [a[0] for a in calls] == [bf16]


def test_encode_reports_progress_and_caches(model_dirs, converted, monkeypatch):
    model = KosmosGLoader.execute(converted, device="cpu").result[0]
    updates = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append((value, total)))
    try:
        prompt = run_prompt("<i> and <i>", [image(5), image(6)])
        first = KosmosGEncode.execute(model, prompt, "blurry").result
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert updates and updates[-1] == (4, 4)  # 2 images + 1 positive prompt + the negative
    calls = []
    monkeypatch.setattr(encode, "encode_prompt", lambda *a: calls.append(a))
    again = KosmosGEncode.execute(model, run_prompt("<i> and <i>", [image(5), image(6)]), "blurry").result
    assert calls == [] and torch.equal(again[0][0][0], first[0][0][0])
    assert again[0] is not first[0]  # fresh lists: downstream edits cannot corrupt the cache
    monkeypatch.undo()
    # the same prompt, another negative text: not the cached negative (found by a mutation review: the key without
    # negative_text passed every test)
    other = KosmosGEncode.execute(model, run_prompt("<i> and <i>", [image(5), image(6)]), "ugly").result
    assert torch.equal(other[0][0][0], first[0][0][0])
    assert torch.equal(other[1][0][0], model.pipeline.encode_unconditional("ugly"))
    assert not torch.equal(other[1][0][0], first[1][0][0])


def _restart_comfy():
    """What a ComfyUI restart forgets: loaded models, the node caches, the pipeline's in-memory caches."""
    mm.unload_all_models()
    model_management.clear_cache()  # the models, with Encode's results kept on them


def test_encode_disk_cache_survives_a_restart(model_dirs, converted, user_directory, monkeypatch):
    """After a restart the same prompt and images come from the disk cache: the same conditioning, the checkpoint's
    weights never read (the Loader opens the file; the weights are read on the first compute), the model never
    moved to its load device, the progress bar complete."""
    model = KosmosGLoader.execute(converted, dtype="fp32", device="cpu").result[0]
    first = KosmosGEncode.execute(model, run_prompt("<i> and <i>", [image(5), image(6)]), "blurry").result
    folder = user_directory / "__kosmosg_cache"
    assert disk_cache.disk_cache_folder() == str(folder) and len(list(folder.glob("*/*.safetensors"))) == 4  # 2 images,
    del model  # the encoding and the negative
    _restart_comfy()

    monkeypatch.setattr(UnreadWeights, "load", lambda self: pytest.fail("the weights were read"))
    model = KosmosGLoader.execute(converted, dtype="fp32", device="cpu").result[0]
    loads, updates = [], []
    monkeypatch.setattr(mm, "load_models_gpu", lambda *a, **k: loads.append(a))
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append((value, total)))
    try:
        again = KosmosGEncode.execute(model, run_prompt("<i> and <i>", [image(5), image(6)]), "blurry").result
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert loads == [] and updates[-1] == (4, 4) and not model.pipeline.is_loaded
    for got, expected in zip(again, first):
        assert torch.equal(got[0][0], expected[0][0]) and got[0][1]["kosmosg"] == expected[0][1]["kosmosg"]


def test_encode_without_disk_cache_writes_nothing_and_recomputes(model_dirs, converted, user_directory, monkeypatch):
    model = KosmosGLoader.execute(converted, dtype="fp32", device="cpu").result[0]
    first = KosmosGEncode.execute(model, run_prompt("a <i>", [image(5)]), "", False).result[0][0][0]
    assert not (user_directory / "__kosmosg_cache").exists()
    KosmosGEncode.execute(model, run_prompt("a <i> again", [image(5)]), "", True)  # fills the cache
    del model
    _restart_comfy()
    model = KosmosGLoader.execute(converted, dtype="fp32", device="cpu").result[0]
    loads = []
    monkeypatch.setattr(model, "load_for_encoding", lambda: loads.append(1))
    again = KosmosGEncode.execute(model, run_prompt("a <i>", [image(5)]), "", False).result[0][0][0]
    assert loads == [1, 1] and torch.equal(again, first)  # the positive and the negative computed, not read


def test_turning_the_disk_cache_on_keeps_what_memory_already_holds(model_dirs, converted, user_directory,
                                                                   monkeypatch):
    """Encoded with disk_cache off, then on (the node's and the pipeline's memory hold the features and the
    negative): after a restart all of it comes from disk, the model not asked for."""
    model = KosmosGLoader.execute(converted, dtype="fp32", device="cpu").result[0]
    first = KosmosGEncode.execute(model, run_prompt("a <i>", [image(5)]), "", False).result
    KosmosGEncode.execute(model, run_prompt("a <i>", [image(5)]), "", True)
    del model
    _restart_comfy()
    model = KosmosGLoader.execute(converted, dtype="fp32", device="cpu").result[0]
    loads = []
    monkeypatch.setattr(model, "load_for_encoding", lambda: loads.append(1))
    again = KosmosGEncode.execute(model, run_prompt("a <i>", [image(5)]), "", True).result
    assert loads == [] and all(torch.equal(a[0][0], b[0][0]) for a, b in zip(again, first))


def test_disk_cache_size_comes_from_the_environment(model_dirs, converted, user_directory, monkeypatch, caplog):
    """KOSMOSG_DISK_CACHE_GIB sets the limit for every workflow; 0 turns the disk cache off; nonsense is said and
    the default used."""
    from kosmosg_pack.kosmosg_core.config import DISK_CACHE_MAX_BYTES

    monkeypatch.setenv("KOSMOSG_DISK_CACHE_GIB", "2.5")
    assert disk_cache.shared_disk_cache().max_bytes == int(2.5 * 2**30)
    for text in ("lots", "-1", "inf"):
        monkeypatch.setenv("KOSMOSG_DISK_CACHE_GIB", text)
        caplog.clear()
        assert disk_cache.shared_disk_cache().max_bytes == DISK_CACHE_MAX_BYTES
        assert "KOSMOSG_DISK_CACHE_GIB" in caplog.text and "not a number of GiB >= 0" in caplog.text
    monkeypatch.setenv("KOSMOSG_DISK_CACHE_GIB", "0")
    assert disk_cache.shared_disk_cache() is None
    model = KosmosGLoader.execute(converted, dtype="fp32", device="cpu").result[0]
    KosmosGEncode.execute(model, run_prompt("a <i>", [image(5)]))
    assert not (user_directory / "__kosmosg_cache").exists()


def test_validation_of_api_prompts_without_or_with_odd_file_inputs(model_dirs):
    """An API prompt that leaves a file input out gets ComfyUI's own "required input missing" (the validators
    raised "missing 1 required positional argument"); a number instead of a file name is named, not a
    "join() argument must be str" error."""
    for validate in (KosmosGLoader.validate_inputs, KosmosGConvertCheckpoint.validate_inputs,
                     KosmosGLoadConditioning.validate_inputs, KosmosGInterleavedPrompt.validate_inputs):
        assert validate() is True
    for validate in (KosmosGLoader.validate_inputs, KosmosGConvertCheckpoint.validate_inputs,
                     KosmosGLoadConditioning.validate_inputs):
        message = validate(123)
        assert isinstance(message, str) and "123 was not found" in message
    kosmosg_dir, cond_dir = model_dirs
    (kosmosg_dir / "notes.json").write_text("{}")  # in the folder, but not a file the list offers
    (cond_dir / "notes.json").write_text("{}")
    for validate in (KosmosGLoader.validate_inputs, KosmosGConvertCheckpoint.validate_inputs,
                     KosmosGLoadConditioning.validate_inputs):
        assert "'notes.json' was not found" in validate("notes.json")
    assert KosmosGLoader.validate_inputs("tiny.pt") is True
    message = KosmosGLoadConditioning.validate_inputs("gone.safetensors")
    assert "Conditioning file 'gone.safetensors' was not found" in message and "Save Conditioning" in message
    with pytest.raises(FileNotFoundError) as err:
        KosmosGLoadConditioning.execute("gone.safetensors")
    assert str(err.value) == message


def test_encode_cache_tells_integer_images_from_float_images(model_dirs, converted):
    """A uint8 IMAGE (0..255) and a float IMAGE (0..1) holding the same numbers are different pictures: the
    second encode got the first one's cached conditioning (the fingerprint hashed both as float32)."""
    model = KosmosGLoader.execute(converted, device="cpu").result[0]
    dark = torch.ones(1, 16, 16, 3, dtype=torch.uint8)  # 1/255: nearly black
    white = torch.ones(1, 16, 16, 3)  # 1.0: white
    KosmosGEncode.execute(model, run_prompt("<i>", [white]))
    got = KosmosGEncode.execute(model, run_prompt("<i>", [dark])).result[0][0][0]
    assert torch.allclose(got, model.pipeline.encode("<i>", [dark[0]]).float(), atol=1e-6)


def test_encode_names_a_prompt_that_is_not_valid_text(model_dirs, converted):
    """A lone surrogate (an API prompt's JSON "\\ud800") gave a bare UnicodeEncodeError from the cache key."""
    model = KosmosGLoader.execute(converted, device="cpu").result[0]
    with pytest.raises(PromptError, match="not valid text"):
        KosmosGEncode.execute(model, run_prompt("a \ud800 <i>", [image(1)]))


def test_encode_cache_is_bounded_by_bytes(model_dirs, converted, monkeypatch):
    model = KosmosGLoader.execute(converted, device="cpu").result[0]
    monkeypatch.setattr(encode, "MAX_CACHED_BYTES", 77 * 768 * 4 * 3)  # room for one B=1 pair, not two
    KosmosGEncode.execute(model, run_prompt("a cat"))
    KosmosGEncode.execute(model, run_prompt("a dog"))
    assert len(model.encodings) == 1 and encode._cached_bytes(model.encodings) <= encode.MAX_CACHED_BYTES


def test_encode_is_interruptible(model_dirs, converted):
    model = KosmosGLoader.execute(converted, device="cpu").result[0]
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            KosmosGEncode.execute(model, run_prompt("<i>", [image(7)]))
    finally:
        mm.interrupt_current_processing(False)


def test_encode_rejects_image_in_negative(model_dirs, converted):
    model = KosmosGLoader.execute(converted, device="cpu").result[0]
    with pytest.raises(PromptError, match="negative"):
        KosmosGEncode.execute(model, run_prompt("a cat"), "<i>")
    # ComfyUI writes "negative_text - " before the message: the name once
    assert KosmosGEncode.validate_inputs("a <i>").startswith("The negative prompt contains <i>")
    assert KosmosGEncode.validate_inputs("blurry") is True and KosmosGEncode.validate_inputs(None) is True
    with pytest.raises(PromptError, match=r"^negative_text: The negative prompt is \d+ tokens long"):
        KosmosGEncode.execute(model, run_prompt("a cat"), "blurry " * 400)


# --- save / load conditioning ----------------------------------------------------------------------
def test_save_load_conditioning_round_trip_content_keyed(model_dirs):
    _, cond_dir = model_dirs
    cond = torch.randn(1, 77, 768)
    conditioning = [[cond, {"pooled_output": cond.mean(1), "kosmosg": {"text": "<i>"}, "strength": 0.5,
                            "control": object()}]]
    saved = KosmosGSaveConditioning.execute(conditioning, "subject")
    name = saved.result[0]
    assert name.startswith("subject_") and (cond_dir / name).is_file()
    # the ControlNet left out is said in the node's text, not only in the server log
    assert f"Saved {name} (without control: not data" in str(saved.ui.as_dict())
    assert KosmosGSaveConditioning.execute(conditioning, "subject").result[0] == name
    assert len(list(cond_dir.iterdir())) == 1
    other = KosmosGSaveConditioning.execute([[cond + 1, {}]], "subject").result[0]
    assert other != name
    folder_paths.filename_list_cache.clear()
    assert KosmosGLoadConditioning.validate_inputs(name) is True
    loaded = KosmosGLoadConditioning.execute(name).result[0]
    assert torch.equal(loaded[0][0], cond)
    assert torch.equal(loaded[0][1]["pooled_output"], cond.mean(1))
    assert loaded[0][1]["kosmosg"] == {"text": "<i>"} and loaded[0][1]["strength"] == 0.5
    assert "control" not in loaded[0][1]


def test_save_conditioning_rewrites_a_damaged_file_of_its_name_and_names_a_long_prefix(model_dirs):
    _, cond_dir = model_dirs
    conditioning = [[torch.randn(1, 77, 768), {}]]
    name = KosmosGSaveConditioning.execute(conditioning, "subject").result[0]
    (cond_dir / name).write_bytes(b"")  # e.g. a crash left an empty file: it was trusted from then on
    assert KosmosGSaveConditioning.execute(conditioning, "subject").result[0] == name
    folder_paths.filename_list_cache.clear()
    assert torch.equal(KosmosGLoadConditioning.execute(name).result[0][0][0], conditioning[0][0])
    with pytest.raises(ValueError, match=r"filename_prefix .*: the name is longer than the file system allows \(269 bytes"):  # the pack's OutputPathError
        KosmosGSaveConditioning.execute(conditioning, "p" * 240)
    # found by a review: checked when the prompt is queued, before the encode upstream runs
    assert "the name is longer than the file system allows" in KosmosGSaveConditioning.validate_inputs("p" * 240)
    assert "must be a plain name (no folders)" in KosmosGSaveConditioning.validate_inputs("sub/dir/name")
    assert KosmosGSaveConditioning.validate_inputs("subject") is True
    assert KosmosGSaveConditioning.validate_inputs(None) is True  # from a link: checked when it runs


@pytest.mark.parametrize("cond, message", [
    (torch.full((1, 77, 8), float("nan")), "entry 1 holds inf/NaN values"),
    (torch.ones(1, 77, 8, dtype=torch.int64), r"entry 1 is torch.int64 \[1, 77, 8\], not a \[batch, tokens"),
    (torch.randn(1, 1, 77, 8), r"entry 1 is torch.float32 \[1, 1, 77, 8\]"),
    (torch.randn(0, 77, 8), r"entry 1 is torch.float32 \[0, 77, 8\]"),
])
def test_save_conditioning_refuses_what_load_would_refuse(model_dirs, cond, message):
    """Save wrote these, and Load Conditioning then refused the file ("Save the conditioning again"): the
    work looked saved but was not. Save now says so at once and writes nothing."""
    _, cond_dir = model_dirs
    with pytest.raises(ValueError, match=message):
        KosmosGSaveConditioning.execute([[torch.randn(1, 77, 8), {}], [cond, {}]], "bad")
    assert list(cond_dir.iterdir()) == []


def test_saved_conditioning_keeps_tuples_dtypes_and_nested_tensors(model_dirs):
    """What ComfyUI's nodes put in a conditioning comes back as it went in: `area` a tuple (the sampler
    compares areas with ==; a list made a duplicate negative), the cond's dtype, tensors inside lists."""
    cond = torch.randn(2, 77, 768).half()
    latents = [torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)]
    extras = {"area": (8, 8, 0, 0), "area_pct": ("percentage", 0.5, 0.5, 0.0, 0.0), "strength": 0.7,
              "reference_latents": latents, "nested": {"t": torch.arange(3), "a.b": 1}, "timestep_start": 0.9,
              "mask": torch.ones(1, 8, 8), "hooks": [object()], "empty": None}
    name = KosmosGSaveConditioning.execute([[cond, extras]], "typed").result[0]
    folder_paths.filename_list_cache.clear()
    (loaded_cond, loaded), = KosmosGLoadConditioning.execute(name).result[0]
    assert loaded_cond.dtype == torch.float16 and torch.equal(loaded_cond, cond)
    assert loaded["area"] == (8, 8, 0, 0) and isinstance(loaded["area"], tuple)
    assert loaded["area_pct"] == ("percentage", 0.5, 0.5, 0.0, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(loaded["reference_latents"], latents, strict=True))
    assert torch.equal(loaded["nested"]["t"], torch.arange(3)) and loaded["nested"]["a.b"] == 1
    assert torch.equal(loaded["mask"], extras["mask"]) and loaded["strength"] == 0.7 and loaded["empty"] is None
    assert "hooks" not in loaded  # a live object: dropped with a warning, with nothing of it left behind


def test_load_conditioning_reads_version_1_files_and_cli_encode_output(model_dirs, converted, tmp_path):
    from kosmosg_core.cli import main as cli_main
    from kosmosg_core.files import save_safetensors

    kosmosg_dir, cond_dir = model_dirs
    cond = torch.randn(1, 77, 768)
    save_safetensors({"entry0.cond": cond, "entry0.pooled_output": cond.mean(1)}, cond_dir / "v1.safetensors",
                     {"format": "kosmosg_conditioning", "format_version": "1",
                      "entries": json.dumps([{"area": [8, 8, 0, 0], "strength": 0.5}])})
    assert cli_main(["encode", "--checkpoint", str(kosmosg_dir / converted), "--prompt", "a cat",
                     "--out", str(cond_dir / "cli.safetensors")]) in (0, None)
    folder_paths.filename_list_cache.clear()
    (v1_cond, v1), = KosmosGLoadConditioning.execute("v1.safetensors").result[0]
    assert torch.equal(v1_cond, cond) and torch.equal(v1["pooled_output"], cond.mean(1))
    assert v1["area"] == (8, 8, 0, 0) and v1["strength"] == 0.5
    model = KosmosGLoader.execute(converted, dtype="fp32", device="cpu").result[0]
    (expected, expected_extras), = KosmosGEncode.execute(model, run_prompt("a cat")).result[0]
    (cli_cond, cli_extras), = KosmosGLoadConditioning.execute("cli.safetensors").result[0]
    assert torch.allclose(cli_cond, expected, atol=1e-6)
    assert torch.allclose(cli_extras["pooled_output"], expected_extras["pooled_output"], atol=1e-6)


def test_load_conditioning_rejects_foreign_and_missing_files(model_dirs):
    from safetensors.torch import save_file

    _, cond_dir = model_dirs
    save_file({"x": torch.zeros(2)}, str(cond_dir / "foreign.safetensors"))
    folder_paths.filename_list_cache.clear()
    with pytest.raises(ValueError, match="not a Kosmos-G conditioning file"):
        KosmosGLoadConditioning.execute("foreign.safetensors")
    cond = torch.randn(1, 77, 8)
    header = {"format": "kosmosg_conditioning", "format_version": "2"}
    for name, tensors, entries, message in (  # damaged or crafted files: one line naming the file and the fault
        ("refs", {"entry0.cond": cond}, [{"m": {"__tensor__": "entry0.nope"}}], "refers to a tensor 'entry0.nope'"),
        ("nocond", {"entry0.cond": cond}, [{}, {}], "entry 1 has no tensor entry1.cond"),
        ("json", {"entry0.cond": cond}, "[{", "entries are not readable JSON"),
        ("deep", {"entry0.cond": cond}, "[" * 100000 + "]" * 100000, "entries are not readable JSON"),
        ("ints", {"entry0.cond": cond}, [5], "not a non-empty list of mappings"),
        ("empty", {"entry0.cond": cond}, [], "not a non-empty list of mappings"),
        ("shape", {"entry0.cond": torch.randn(5)}, [{}], r"entry0.cond is torch.float32 \[5\], not a \[batch"),
        ("ints-cond", {"entry0.cond": torch.ones(1, 77, 8, dtype=torch.int64)}, [{}], "torch.int64"),
        ("nan", {"entry0.cond": torch.full((1, 77, 8), float("nan"))}, [{}], "holds inf/NaN"),
    ):
        text = entries if isinstance(entries, str) else json.dumps(entries)
        save_file(tensors, str(cond_dir / f"{name}.safetensors"), {**header, "entries": text})
        folder_paths.filename_list_cache.clear()
        with pytest.raises(ValueError, match=message):
            KosmosGLoadConditioning.execute(f"{name}.safetensors")
    with pytest.raises(ValueError, match="conditioning is empty"):
        KosmosGSaveConditioning.execute([], "empty")
    message = KosmosGLoadConditioning.validate_inputs("gone.safetensors")
    assert "gone.safetensors" in message and str(cond_dir) in message


# --- convert ---------------------------------------------------------------------------------------
def test_convert_writes_safetensors_equal_to_official(model_dirs, converted):
    kosmosg_dir, _ = model_dirs
    assert converted == "tiny-conv.safetensors" and (kosmosg_dir / converted).is_file()
    assert KosmosGConvertCheckpoint.define_schema().inputs[0].options == ["tiny.pt"]
    official = KosmosGLoader.execute("tiny.pt", dtype="fp32", device="cpu").result[0]
    new = KosmosGLoader.execute(converted, dtype="fp32", device="cpu").result[0]
    prompt = run_prompt("a <i> in town", [image(8)])
    assert torch.allclose(KosmosGEncode.execute(official, prompt).result[0][0][0],
                          KosmosGEncode.execute(new, prompt).result[0][0][0], atol=1e-6)
    with pytest.raises(FileExistsError, match="overwrite"):
        KosmosGConvertCheckpoint.execute("tiny.pt", output_name="tiny-conv", dtype="fp32")
    with pytest.raises(ValueError, match="plain file name"):
        KosmosGConvertCheckpoint.execute("tiny.pt", output_name="../escape", dtype="fp32")
    message = KosmosGConvertCheckpoint.validate_inputs("nope.pt")  # before the run, and during it: one text
    assert "Kosmos-G checkpoint 'nope.pt' was not found" in message and "dict.txt" in message
    with pytest.raises(FileNotFoundError) as err:
        KosmosGConvertCheckpoint.execute("nope.pt")
    assert str(err.value) == message


def test_convert_never_writes_over_its_source(model_dirs, converted):
    """A .safetensors source (an API prompt may name one) with an empty output_name is its own output: the
    node said "set overwrite to true", and with overwrite it re-cast the source in place (an fp32 file
    became fp16). Refused like the CLI's --out, whatever overwrite says."""
    kosmosg_dir, _ = model_dirs
    before = (kosmosg_dir / converted).read_bytes()
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="is the input file"):
            KosmosGConvertCheckpoint.execute(converted, output_name="", dtype="fp16", overwrite=overwrite)
    assert (kosmosg_dir / converted).read_bytes() == before


@pytest.mark.parametrize("source, output_name, expected", [
    ("tiny.pt", "", "tiny.safetensors"),
    ("release/checkpoint_final.pt", "", "checkpoint_final.safetensors"),  # a subfolder of models/kosmosg
    ("tiny.pt", "  mine ", "mine.safetensors"),
    ("tiny.pt", "mine.safetensors", "mine.safetensors"),
    ("tiny.pt", "mine.SafeTensors", "mine.safetensors"),
    ("tiny.pt", "mine.pt", "mine.safetensors"),
    ("tiny.pt", "kosmosg.v2", "kosmosg.v2.safetensors"),
])
def test_convert_output_name(source, output_name, expected):
    assert converted_file_name(source, output_name) == expected


@pytest.mark.parametrize("output_name, message", [
    ("../escape", "plain file name"), ("sub/name", "plain file name"), ("..", "plain file name"),
    (".safetensors", "dot"), (".hidden", "dot"),
])
def test_convert_output_name_refused(output_name, message):
    with pytest.raises(ValueError, match=message):
        converted_file_name("tiny.pt", output_name)


def test_convert_from_a_subfolder_writes_beside_the_source(model_dirs):
    import shutil

    kosmosg_dir, _ = model_dirs
    (kosmosg_dir / "release").mkdir()
    shutil.move(kosmosg_dir / "tiny.pt", kosmosg_dir / "release" / "tiny.pt")
    shutil.move(kosmosg_dir / "data", kosmosg_dir / "release" / "data")
    folder_paths.filename_list_cache.clear()
    source = os.path.join("release", "tiny.pt")
    out = KosmosGConvertCheckpoint.execute(source, output_name="", dtype="fp32")
    assert out.result[0] == os.path.join("release", "tiny.safetensors")
    assert (kosmosg_dir / "release" / "tiny.safetensors").is_file()


# --- official sampler ------------------------------------------------------------------------------
def comfy_model(model_type_name: str = "EPS"):
    """What the sampler node reads of a MODEL: the model_sampling ComfyUI's own model_base builds for a checkpoint of
    that ModelType (default: SD1.5's, EPS with default settings), behind the ModelPatcher accessor."""
    import types

    import comfy.model_base

    sampling = comfy.model_base.model_sampling(None, getattr(comfy.model_base.ModelType, model_type_name))
    return types.SimpleNamespace(get_model_object=lambda name: {"model_sampling": sampling}[name])


class ComfyDenoiser:
    """What ComfyUI's KSAMPLER.sample calls, for an epsilon-prediction model `predict_noise(model_input [B, C, H, W],
    timestep [B]) -> [B, C, H, W]` (model_input: what a U-Net sees, x / sqrt(1 + sigma^2)): the data estimate
    x - sigma * eps, with the attributes KSAMPLER reads (the model's sampling; cfg and patcher for its log line)."""

    def __init__(self, model_sampling, predict_noise):
        import types

        self.inner_model = types.SimpleNamespace(model_sampling=model_sampling)
        self.cfg, self.model_patcher = 1.0, types.SimpleNamespace(model=None)
        self.predict_noise = predict_noise

    def __call__(self, x, sigma, **_):
        s = sigma.reshape(-1, 1, 1, 1)
        return x - s * self.predict_noise(x / (1 + s**2).sqrt(), self.inner_model.model_sampling.timestep(sigma))


def comfy_sample(sampler, sigmas, denoiser, noise, callback=None, disable_pbar=True):
    """A whole run of ComfyUI's own KSAMPLER.sample (its noise scaling, its k-diffusion solver) from `noise` on an
    empty latent -> the final latent, in ComfyUI's scaling (x = data + sigma * noise)."""
    return sampler.sample(denoiser, sigmas, {}, callback, noise, latent_image=torch.zeros_like(noise),
                          disable_pbar=disable_pbar)


@pytest.mark.parametrize("scheduler, steps", [("dpm", 10), ("dpm", 14), ("dpm", 15), ("dpm", 20), ("dpm", 50),
                                              ("dpm", 100), ("ddim", 30), ("ddim", 50), ("pndm", 50)])
def test_official_sampler_node_is_the_official_scheduler_step_for_step(scheduler, steps):
    """Its sampler + sigmas, run by ComfyUI's KSAMPLER, end where diffusers 0.21.4's own DPM-Solver / DDIM / PNDM (the
    official code's) ended on the same toy model from the same noise
    (tests/reference/official_scheduler_outputs.safetensors), DPM-Solver below 15 steps with the first-order last step
    included, DDIM and PNDM from plain noise at their first level; ComfyUI's KSampler schedules do not."""
    import comfy.samplers
    from safetensors import safe_open

    from reference.generate_official_scheduler_outputs import start_and_centres, toy_noise_prediction

    with safe_open(str(REPO / "tests" / "reference" / "official_scheduler_outputs.safetensors"), "pt") as f:
        expected = f.get_tensor(f"{scheduler}.{steps}")  # [1, 4, 8, 8], diffusers' latent: sqrt(alpha_bar) * ComfyUI's
    model = comfy_model()
    model_sampling = model.get_model_object("model_sampling")
    start, centres = start_and_centres()

    def predict_noise(model_input, timestep):
        alpha_cumprod = 1 / (1 + model_sampling.sigma(timestep) ** 2)
        return toy_noise_prediction(model_input, alpha_cumprod, centres)

    def run(sampler, sigmas):
        final = comfy_sample(sampler, sigmas, ComfyDenoiser(model_sampling, predict_noise), start)
        return final / (1 + sigmas[-1] ** 2).sqrt()  # in diffusers' scaling, to compare

    sampler, sigmas = KosmosGOfficialSampler.execute(model, steps, scheduler).result
    assert sigmas.shape == (steps + 1,) and sigmas[-1] == model_sampling.sigma_min
    assert (run(sampler, sigmas) - expected).abs().max() < 1e-5
    nearest = {"dpm": ("dpmpp_2m", ("normal", "sgm_uniform", "simple")), "ddim": ("ddim", ("ddim_uniform", "normal")),
               "pndm": ("ipndm", ("ddim_uniform", "normal"))}
    sampler_name, grids = nearest[scheduler]
    for grid_name in grids:  # KSampler's nearest: a different path
        grid = comfy.samplers.calculate_sigmas(model_sampling, grid_name, steps)
        assert (run(comfy.samplers.sampler_object(sampler_name), grid) - expected).abs().max() > 1e-4, grid_name
    if scheduler == "ddim":  # the same levels with ComfyUI's own noise scaling below sigma_max: not the official start
        plain_euler = comfy.samplers.KSAMPLER(comfy.k_diffusion.sampling.sample_euler)
        assert (run(plain_euler, sigmas) - expected).abs().max() > 1e-4
        assert not sampler.max_denoise(ComfyDenoiser(model_sampling, None), sigmas[5:])  # split sigmas: ComfyUI's
    if scheduler == "pndm":  # DDIM's step through the same levels from the same start: the blends matter
        ddim, _ = KosmosGOfficialSampler.execute(model, steps, "ddim").result
        assert (run(ddim, sigmas) - expected).abs().max() > 1e-4


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 20, 999])
def test_official_sampler_pndm_is_diffusers_pndm_at_every_step_count(steps):
    """PNDM's warm-up (one step alone: DDIM's; then a Heun step, then blends of 2, 3 and 4 predictions) at each count
    where it changes, against the installed diffusers' PNDMScheduler on SD1.5's settings (its step is 0.21.4's:
    tests/test_official_sampling.py), with as many model calls as diffusers makes (steps + 1 from 2 steps on)."""
    from reference.generate_official_scheduler_outputs import run_trajectory, sd15_schedule_config, start_and_centres
    from reference.generate_official_scheduler_outputs import toy_noise_prediction

    from kosmosg_pack.kosmosg_core.sd15 import official_scheduler

    model = comfy_model()
    model_sampling = model.get_model_object("model_sampling")
    start, centres = start_and_centres()
    calls = []

    def predict_noise(model_input, timestep):
        calls.append(int(timestep.round()))
        return toy_noise_prediction(model_input, 1 / (1 + model_sampling.sigma(timestep) ** 2), centres)

    sampler, sigmas = KosmosGOfficialSampler.execute(model, steps, "pndm").result
    final = comfy_sample(sampler, sigmas, ComfyDenoiser(model_sampling, predict_noise), start)
    expected, timesteps = run_trajectory(official_scheduler("pndm", sd15_schedule_config()), steps)
    assert calls == timesteps  # diffusers runs its second timestep twice: the Heun step's second call
    # float32 rounding, relative: at 2 steps the blend extrapolates from the largest noise level to the smallest in one
    # step (1e-5 of the result there; the two agree to 1e-14 in float64)
    assert (final / (1 + sigmas[-1] ** 2).sqrt() - expected).abs().max() < 2e-5 * expected.abs().max()


@pytest.mark.parametrize("scheduler, steps", [("dpm", 10), ("dpm", 20), ("ddim", 20), ("pndm", 20)])
def test_sampler_custom_with_the_official_sampler_samples_as_the_official_pipeline(scheduler, steps):
    """End to end on one U-Net (random, SD1.5-shaped: ComfyUI detects and loads it as SD1.5): SamplerCustom's own
    sampling (comfy.sample.sample_custom: ComfyUI's CFG, model wrapper, noise scaling) with the node's sampler and
    sigmas and RandomNoise's seeded noise ends where diffusers' StableDiffusionPipeline ends with the scheduler and
    noise `generate` gives it (official_scheduler, `--noise official`), CFG 6, in float32 on the CPU: to float
    rounding, once ComfyUI's latent is put in diffusers' scale (x SD1.5's 0.18215, x sqrt(alpha_bar_0))."""
    import json

    import comfy.sample
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    from kosmosg_pack.kosmosg_core.config import SD15_CONFIG_DIR, SD15_LATENT_SCALE
    from kosmosg_pack.kosmosg_core.sd15 import official_scheduler
    from kosmosg_pack.kosmosg_core.sampling import official_noise_generator

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, layers_per_block=1, block_out_channels=(320,), cross_attention_dim=768,
                                down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                                attention_head_dim=8)
    ldm = dict(num_res_blocks=[1], channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
               transformer_depth_middle=1)  # the same U-Net in ComfyUI's (LDM) names
    weights = unet.state_dict()
    patcher = comfy.sd.load_diffusion_model_state_dict(
        {ldm_key: weights[key] for key, ldm_key in comfy.utils.unet_to_diffusers(ldm).items() if key in weights})
    cond, uncond = (torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(k)) for k in (1, 2))
    seed, latent = 5, torch.zeros(1, 4, 8, 8)

    sampler, sigmas = KosmosGOfficialSampler.execute(patcher, steps, scheduler).result
    comfy_latent = comfy.sample.sample_custom(patcher, comfy.sample.prepare_noise(latent, seed), 6.0, sampler, sigmas,
                                              [[cond, {}]], [[uncond, {}]], latent, seed=seed, disable_pbar=True)

    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), norm_num_groups=8)  # unused: latents out; its 2 levels: 16 px
    scheduler_config = json.loads((SD15_CONFIG_DIR / "scheduler" / "scheduler_config.json").read_text())
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, safety_checker=None,
                                   scheduler=official_scheduler(scheduler, scheduler_config), feature_extractor=None,
                                   requires_safety_checker=False)
    official = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps, guidance_scale=6.0,
                    generator=official_noise_generator(seed, "cpu"), height=16, width=16, output_type="latent").images
    alpha_bar_0 = 1 / (1 + sigmas[-1] ** 2)
    in_diffusers_scale = comfy_latent * SD15_LATENT_SCALE * alpha_bar_0.sqrt()
    assert (in_diffusers_scale - official).abs().max() < 1e-5 * official.abs().max()


def test_sampler_custom_draws_the_starting_noise_generate_draws():
    """SamplerCustom's noise (RandomNoise: comfy.sample.prepare_noise, float32 on the CPU) for seed s is what
    `generate --seed s` starts from in float32 on the CPU: `--noise official` for any batch (one draw after seeding),
    `--noise per-image` for one picture (its generator seeded with s)."""
    import comfy.sample
    from diffusers.utils.torch_utils import randn_tensor

    from kosmosg_pack.kosmosg_core.generate import image_generators
    from kosmosg_pack.kosmosg_core.sampling import official_noise_generator

    for batch in (1, 3):
        comfy_noise = comfy.sample.prepare_noise(torch.zeros(batch, 4, 8, 8), 7)
        official = randn_tensor((batch, 4, 8, 8), generator=official_noise_generator(7, "cpu"), dtype=torch.float32)
        assert torch.equal(comfy_noise, official)
    per_image = randn_tensor((1, 4, 8, 8), generator=image_generators(7, 1), dtype=torch.float32)
    assert torch.equal(comfy.sample.prepare_noise(torch.zeros(1, 4, 8, 8), 7), per_image)


@pytest.mark.parametrize("choice, dtype", [("fp32", torch.float32), ("fp16", torch.float16)])
def test_official_noise_node_draws_the_whole_batch_as_the_demo_calls_it(choice, dtype):
    """Kosmos-G Official Noise: every picture's noise in one draw, what the demo's call gives (torch.manual_seed, then
    torch.randn of the whole batch on the device in the dtype; here the CPU), handed on as ComfyUI's noise arrives
    (float32 on the CPU); in float32 on the CPU that is also what RandomNoise draws."""
    import comfy.sample

    (noise,) = KosmosGOfficialNoise.execute(7, choice).result
    latent = torch.zeros(3, 4, 8, 8)
    drawn = noise.generate_noise({"samples": latent})
    assert noise.seed == 7 and drawn.dtype == torch.float32 and drawn.device.type == "cpu"
    with torch.random.fork_rng():
        torch.manual_seed(7)
        demo = torch.randn(latent.shape, device=mm.get_torch_device(), dtype=dtype)
    assert torch.equal(drawn, demo.float().cpu())
    if dtype == torch.float32:
        assert torch.equal(drawn, comfy.sample.prepare_noise(latent, 7))


def test_official_noise_gives_a_latents_batch_rows_and_says_when_it_is_not_the_demos(caplog):
    """A latent that names its rows (`batch_index`, e.g. Latent From Batch: picture 2 of the demo's batch) gets those
    rows of the whole draw, as RandomNoise does for its draw; a latent of several tensors is refused by name; on a
    device other than a CUDA GPU (here the CPU) the log says it is not the demo's noise."""
    import logging

    import comfy.nested_tensor
    import comfy.sample

    from kosmosg_pack.nodes import sampling

    (noise,) = KosmosGOfficialNoise.execute(7, "fp32").result
    one = {"samples": torch.zeros(1, 4, 8, 8), "batch_index": [2]}
    sampling._warn_not_the_demos_device.cache_clear()
    with caplog.at_level(logging.WARNING):
        drawn = noise.generate_noise(one)
    assert torch.equal(drawn, noise.generate_noise({"samples": torch.zeros(3, 4, 8, 8)})[2:])
    assert torch.equal(drawn, comfy.sample.prepare_noise(one["samples"], 7, [2]))
    assert "draws on cpu: the official demo drew on a CUDA GPU" in caplog.text
    nested = comfy.nested_tensor.NestedTensor([torch.zeros(1, 4, 8, 8), torch.zeros(1, 8, 4, 4)])
    with pytest.raises(Exception, match="several tensors .*use RandomNoise"):
        noise.generate_noise({"samples": nested})


def test_official_sampler_reports_every_step_to_the_progress_bar(monkeypatch):
    """ComfyUI's progress bar counts each step; the console shows one bar (there were two below 15 steps)."""
    import comfy.k_diffusion.sampling as k_sampling

    model = comfy_model()
    sampler, sigmas = KosmosGOfficialSampler.execute(model, 5).result  # 5 < 15: with the first-order last step
    denoiser = ComfyDenoiser(model.get_model_object("model_sampling"), lambda x, t: torch.tanh(x))
    seen, bars = [], []
    real_trange = k_sampling.trange
    monkeypatch.setattr(k_sampling, "trange", lambda *a, **k: bars.append(not k.get("disable")) or real_trange(*a, **k))
    comfy_sample(sampler, sigmas, denoiser, torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0)),
                 callback=lambda step, denoised, x, total: seen.append((step, total)), disable_pbar=False)
    assert seen == [(i, 5) for i in range(5)]
    assert bars.count(True) == 1, bars
    seen.clear()
    sampler, sigmas = KosmosGOfficialSampler.execute(model, 5, "pndm").result  # 6 model calls, 5 steps
    comfy_sample(sampler, sigmas, denoiser, torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0)),
                 callback=lambda step, denoised, x, total: seen.append((step, total)), disable_pbar=False)
    assert seen == [(i, 5) for i in range(5)]


def test_the_pack_and_its_sampling_nodes_need_no_diffusers():
    """The pack's nodes run in a ComfyUI without diffusers (requirements.txt leaves it out): in a fresh process where
    `import diffusers` fails, the pack imports and both sampling nodes run, and nothing imported diffusers."""
    import subprocess

    script = f"""
import sys, types
sys.modules["diffusers"] = None  # `import diffusers` now fails
sys.path[:0] = [{str(REPO / "tests")!r}]
from support.comfy_modules import import_comfy
import_comfy()
import importlib.util
spec = importlib.util.spec_from_file_location("kosmosg_pack", {str(REPO / "__init__.py")!r},
                                              submodule_search_locations=[{str(REPO)!r}])
pack = importlib.util.module_from_spec(spec); sys.modules["kosmosg_pack"] = pack; spec.loader.exec_module(pack)
import comfy.model_base, torch
from kosmosg_pack.nodes.sampling import KosmosGOfficialNoise, KosmosGOfficialSampler
sampling = comfy.model_base.model_sampling(None, comfy.model_base.ModelType.EPS)
_, sigmas = KosmosGOfficialSampler.execute(types.SimpleNamespace(get_model_object=lambda name: sampling), 50).result
(noise,) = KosmosGOfficialNoise.execute(1, "fp16").result
print(tuple(sigmas.shape), tuple(noise.generate_noise({{"samples": torch.zeros(1, 4, 8, 8)}}).shape),
      sys.modules["diffusers"])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[-2] == "(51,) (1, 4, 8, 8) None"


@pytest.mark.parametrize("model_type", ["EPS", "V_PREDICTION"])
def test_official_sampler_takes_sd15_type_models(model_type):
    model = comfy_model(model_type)
    _, sigmas = KosmosGOfficialSampler.execute(model, 50).result
    assert torch.equal(sigmas[[0, -1]], model.get_model_object("model_sampling").sigmas[[999, 0]].float())


@pytest.mark.parametrize("model_type, named", [
    ("FLOW", "ModelSamplingDiscreteFlow + CONST"), ("STABLE_CASCADE", "StableCascadeSampling + EPS"),
    ("EDM", "ModelSamplingContinuousEDM + EDM"), ("V_PREDICTION_EDM", "ModelSamplingContinuousEDM + V_PREDICTION"),
    ("FLUX", "ModelSamplingFlux + CONST")])
def test_official_sampler_refuses_models_that_do_not_sample_as_sd15(model_type, named):
    with pytest.raises(Exception, match=f"SD1.5-type model .*samples with {re.escape(named)}. .*SD1.5 checkpoint"):
        KosmosGOfficialSampler.execute(comfy_model(model_type), 50)


def test_official_sampler_refuses_a_patched_sampling_that_reads_timesteps_otherwise():
    """A model patched to another reading of its discrete table (what ComfyUI's ModelSamplingDiscrete node builds as
    ModelSamplingAdvanced(base, prediction): here EDM's) or to another noise scaling."""
    import types

    import comfy.model_sampling as ms

    for bases, named in (((ms.ModelSamplingDiscreteEDM, ms.EDM), "ModelSamplingDiscreteEDM + EDM"),
                         ((ms.ModelSamplingDiscrete, ms.V_PREDICTION_DDPM), "ModelSamplingDiscrete + V_PREDICTION_DDPM")):
        patched = type("ModelSamplingAdvanced", bases, {})()
        model = types.SimpleNamespace(get_model_object=lambda name, patched=patched: patched)
        with pytest.raises(Exception, match=f"samples with {re.escape(named)}"):
            KosmosGOfficialSampler.execute(model, 50)


# --- the shipped nano model ------------------------------------------------------------------------
def test_loader_and_encode_nodes_run_the_shipped_nano_model(monkeypatch):
    """models/nano/kosmosg-nano.safetensors (train.export's output, tokenizer inside) through the nodes:
    the out-of-the-box prompt with its shipped subject images gives the core pipeline's condition."""
    import numpy as np

    from support import nano_ootb

    nano_dir = REPO / "models" / "nano"
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "kosmosg", ([str(nano_dir)], paths.CHECKPOINT_EXTENSIONS))
    folder_paths.filename_list_cache.clear()
    model_management.clear_cache()
    assert "kosmosg-nano.safetensors" in KosmosGLoader.define_schema().inputs[0].options
    model = KosmosGLoader.execute("kosmosg-nano.safetensors", device="cpu").result[0]
    images = [torch.from_numpy(np.asarray(a, dtype=np.float32) / 255.0)[None] for a in nano_ootb.subject_images()]
    prompt = run_prompt(nano_ootb.PROMPT, images)
    positive, negative = KosmosGEncode.execute(model, prompt, "").result
    cond = positive[0][0]
    assert cond.shape == (1, 77, 768) and torch.isfinite(cond).all()
    assert torch.allclose(cond, model.pipeline.encode(nano_ootb.PROMPT, [i[0] for i in images]).float(), atol=1e-5)
    assert not torch.allclose(cond, negative[0][0], atol=1e-3)
    model_management.clear_cache()


# --- Kosmos-G SD1.5 From Checkpoint ------------------------------------------------------------------
@pytest.fixture(scope="module")
def official_with_sd15(tmp_path_factory, official_files):
    """The tiny official checkpoint with a U-Net and VAE stored under the official names (the VAE in float16, as
    the official file stores its weights)."""
    import shutil

    from support.tiny_sd15 import comfy_detectable_sd15_networks, store_sd15_networks

    root = tmp_path_factory.mktemp("official-sd15")
    shutil.copytree(official_files, root, dirs_exist_ok=True)
    unet, vae = comfy_detectable_sd15_networks()
    vae.half().float()  # the values float16 holds: the reference decodes with them
    store_sd15_networks(root / "tiny.pt", unet, out=root / "with-sd15.pt")
    store_sd15_networks(root / "with-sd15.pt", vae=vae, dtype=torch.float16)
    return root, unet, vae


def test_checkpoint_sd15_node_gives_the_stored_unet_and_vae_as_comfyui_model_and_vae(official_with_sd15, monkeypatch):
    """The stored U-Net, renamed to ComfyUI's names and detected by ComfyUI as SD1.5, predicts what the diffusers
    U-Net predicts for the same input; the stored VAE decodes as diffusers' does (ComfyUI's [B, H, W, C] in 0..1)."""
    from kosmosg_pack.nodes.official_sd15 import KosmosGCheckpointSD15

    root, unet, vae = official_with_sd15
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "kosmosg", ([str(root)], paths.CHECKPOINT_EXTENSIONS))
    folder_paths.filename_list_cache.clear()
    assert KosmosGCheckpointSD15.validate_inputs("with-sd15.pt") is True
    model, comfy_vae = KosmosGCheckpointSD15.execute("with-sd15.pt").result
    assert type(model.model).__name__ == "BaseModel" and model.model.model_config.__class__.__name__ == "SD15"
    generator = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, 768, generator=generator)
    timesteps = torch.tensor([999.0, 10.0])
    with torch.no_grad():
        expected = unet(x, timesteps, encoder_hidden_states=context).sample
        got = model.model.diffusion_model(x, timesteps=timesteps, context=context)
        assert (got - expected).abs().max() < 1e-4 * expected.abs().max()
        latent = torch.randn(1, 4, 4, 4, generator=generator)
        pixels = ((vae.decode(latent).sample + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)  # [1, 32, 32, 3]
        decoded = comfy_vae.decode(latent)
        assert decoded.shape == pixels.shape and (decoded - pixels).abs().max() < 1e-3
    # ComfyUI's reload factories (per-device copies: Select VAE Device, multi-GPU), as its own loaders set them
    assert model.cached_patcher_init[0](*model.cached_patcher_init[1]).model.diffusion_model.state_dict().keys() == \
        model.model.diffusion_model.state_dict().keys()
    factory, arguments = comfy_vae.patcher.cached_patcher_init
    assert factory(*arguments).model.state_dict().keys() == comfy_vae.patcher.model.state_dict().keys()


def test_unet_block_layout_of_sd15_is_comfyuis_sd15_layout():
    """At SD1.5's own size (built on the meta device: shapes only), the layout read from the names is the one
    ComfyUI's SD1.5 config holds, every stored tensor gets a ComfyUI name, and ComfyUI detects the renamed U-Net
    as SD1.5."""
    import comfy.model_detection
    from diffusers import UNet2DConditionModel

    from kosmosg_pack.kosmosg_core.config import SD15_CONFIG_DIR
    from kosmosg_pack.kosmosg_core.official_sd15 import unet_block_layout
    from kosmosg_pack.nodes.official_sd15 import unet_in_comfy_names

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIG_DIR / "unet"))
    weights = unet.state_dict()
    layout = unet_block_layout(weights)
    assert layout == {"num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 1, 1, 1],
                      "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                      "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1}
    renamed = unet_in_comfy_names(weights, "sd15")
    assert len(renamed) == len(weights)
    config = comfy.model_detection.model_config_from_unet(renamed, "")
    assert type(config).__name__ == "SD15"
    assert comfy.model_detection.model_config_from_diffusers_unet(weights).unet_config["transformer_depth_output"] == \
        layout["transformer_depth_output"]  # ComfyUI's own reading of the full-size diffusers names agrees


def test_checkpoint_sd15_node_says_what_to_do_without_stored_networks(model_dirs, converted, official_with_sd15):
    """A converted .safetensors (conditioning only) and an official file without them: the error names the missing
    part and says to use Load Checkpoint; a U-Net of another layout is refused by name, not a bare KeyError."""
    from kosmosg_pack.nodes.official_sd15 import KosmosGCheckpointSD15, unet_in_comfy_names

    with pytest.raises(CheckpointError, match=r"stores no SD1.5 U-Net .* load SD1.5 with Load Checkpoint instead"):
        KosmosGCheckpointSD15.execute(converted)
    with pytest.raises(CheckpointError, match=r"tiny.pt stores no SD1.5 U-Net .*Load Checkpoint"):
        KosmosGCheckpointSD15.execute("tiny.pt")
    _, unet, _ = official_with_sd15
    weights = {**unet.state_dict(), "down_blocks.0.motion_modules.0.weight": torch.zeros(1)}  # AnimateDiff-like
    with pytest.raises(CheckpointError, match=r"not laid out as an SD1.5 U-Net \(1 tensor\(s\) .* e\.g\. down_blocks\.0\.motion"):
        unet_in_comfy_names(weights, "x.pt")
    assert "not found" in KosmosGCheckpointSD15.validate_inputs("missing.pt")


def test_checkpoint_sd15_node_refuses_a_stored_unet_missing_tensors(official_with_sd15, tmp_path, monkeypatch):
    """Found by a review: a stored U-Net lacking a tensor loaded as SD1.5 with that weight left random (ComfyUI
    logs "unet missing" and goes on: garbage pictures), or, for a tensor ComfyUI's detection reads, a bare KeyError.
    A file lacking the VAE fails before the U-Net is built (one read of the file). A file damaged after loading:
    ComfyUI's reload factory raises the RuntimeError its callers pass over."""
    import shutil

    from kosmosg_pack.nodes.official_sd15 import KosmosGCheckpointSD15

    root, _, _ = official_with_sd15
    state = torch.load(root / "with-sd15.pt", weights_only=True)
    for name, dropped in (("no-conv-out.pt", ["diffusion_unet.unet.conv_out.weight"]),
                          ("no-key.pt", ["diffusion_unet.unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2."
                                         "to_k.weight"]),
                          ("no-vae.pt", [k for k in state["model"] if k.startswith("vae.vae.")])):
        torch.save({**state, "model": {k: v for k, v in state["model"].items() if k not in dropped}}, tmp_path / name)
    shutil.copytree(root / "data", tmp_path / "data")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "kosmosg", ([str(tmp_path)], paths.CHECKPOINT_EXTENSIONS))
    folder_paths.filename_list_cache.clear()
    with pytest.raises(CheckpointError, match=r"no-conv-out.pt lacks 1 tensor\(s\) of the SD1.5 U-Net ComfyUI detects "
                                              r"\(e\.g\. out\.2\.weight\); load SD1.5 with Load Checkpoint"):
        KosmosGCheckpointSD15.execute("no-conv-out.pt")
    with pytest.raises(CheckpointError, match=r"ComfyUI cannot build the U-Net stored in .*no-key.pt \(.*attn2.to_k"):
        KosmosGCheckpointSD15.execute("no-key.pt")
    built = []
    monkeypatch.setattr(comfy.sd, "load_diffusion_model_state_dict", lambda *a, **k: built.append(1))
    with pytest.raises(CheckpointError, match=r"no-vae.pt stores no SD1.5 VAE"):
        KosmosGCheckpointSD15.execute("no-vae.pt")
    assert built == []
    monkeypatch.undo()
    shutil.copy(root / "with-sd15.pt", tmp_path / "replaced.pt")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "kosmosg", ([str(tmp_path)], paths.CHECKPOINT_EXTENSIONS))
    folder_paths.filename_list_cache.clear()
    model, vae = KosmosGCheckpointSD15.execute("replaced.pt").result
    (tmp_path / "replaced.pt").write_bytes(b"damaged")
    for factory, arguments in (model.cached_patcher_init, vae.patcher.cached_patcher_init):
        with pytest.raises(RuntimeError, match="Kosmos-G SD1.5 From Checkpoint cannot read the (U-Net|VAE) again"):
            factory(*arguments)
