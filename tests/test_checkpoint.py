"""Official key table, size inference, strict key reporting, pack format round trip, lazy loading."""

import pytest
import torch

from kosmosg_core.checkpoint import (
    OFFICIAL_KEYS_TO_IGNORE, describe, infer_config, inspect_checkpoint, load_model, read_checkpoint,
    rename_official_state_dict, save_pack_checkpoint, to_official_state_dict)
from kosmosg_core.config import KosmosGConfig
from kosmosg_core.errors import CheckpointError, CheckpointNotFoundError, TokenizerError
from kosmosg_core.model import KosmosG
from support.tiny_kosmosg import random_kosmosg, write_tiny_official, write_tiny_pack


# a bad file is refused alike by the load and by the check a lazy pipeline makes without reading the weights
BOTH_OPENERS = pytest.mark.parametrize("open_checkpoint", [load_model, inspect_checkpoint], ids=["load", "inspect"])


def head_dim_64_config() -> KosmosGConfig:
    """Small, but every attention has 64-wide heads, like the official model (so sizes are inferable)."""
    return KosmosGConfig.from_dict({
        "vision": {"image_size": 28, "patch_size": 14, "width": 128, "layers": 2, "heads": 2},
        "connector": {"num_queries": 4, "heads": 2},
        "decoder": {"vocab_size": 207, "width": 128, "layers": 2, "heads": 2, "ffn_width": 256},
        "aligner": {"width": 128, "heads": 2, "ffn_width": 256, "encoder_layers": 1, "decoder_layers": 3,
                    "max_positions": 300},
        "image_token_slots": 4})


def test_official_names_round_trip():
    model = random_kosmosg(KosmosGConfig.tiny())
    official = to_official_state_dict(model.state_dict())
    assert "gpt_model.decoder.layers.0.self_attn.inner_attn_ln.weight" in official
    assert "img_model.visual.transformer.resblocks.1.ts_attn.q_proj.weight" in official
    assert "img_connector.latent_query" in official and "aligner.encoder.layers.0.encoder_attn.k_proj.bias" in official
    official["diffusion_unet.unet.conv_in.weight"] = torch.zeros(1)
    official["gpt_model.decoder.self_attn_sope.scale"] = torch.zeros(2)
    official["aligner.decoder_query"] = torch.zeros(3, 2)
    renamed, ignored = rename_official_state_dict(official)
    assert set(renamed) == set(model.state_dict())
    assert sorted(ignored) == sorted(["gpt_model.decoder.output_projection.weight", "diffusion_unet.unet.conv_in.weight",
                                      "gpt_model.decoder.self_attn_sope.scale", "aligner.decoder_query"])
    assert all(OFFICIAL_KEYS_TO_IGNORE.values())  # every ignored pattern states its reason


def test_info_names_what_an_official_file_holds_beyond_conditioning(tmp_path, monkeypatch):
    """`info` says whether an official file carries SD1.5's U-Net and VAE (and the stage-2 training parts): those
    tensors are never read, so it counts them by what they are; a converted file holds none of them."""
    from support.official_checkpoint import build_official_state_dict, save_official_checkpoint

    cfg = KosmosGConfig.tiny()
    pt = save_official_checkpoint(tmp_path / "checkpoint_final.pt", build_official_state_dict(cfg, stage2=True))
    pt.with_suffix(".json").write_text(cfg.to_json())  # tiny heads are not 64 wide: sizes from the sidecar
    not_read = describe(pt)["not_read"]
    assert not_read["SD1.5 U-Net (not for conditioning; generate and Kosmos-G SD1.5 From Checkpoint sample with it)"] == 3
    assert not_read["SD1.5 VAE (not for conditioning; generate and Kosmos-G SD1.5 From Checkpoint decode with it)"] == 3
    assert not_read["tied LM head (same tensor as embed_tokens)"] == 1
    assert not_read["stage-2 reconstruction branch (training only)"] > 0
    assert not_read["stage-2 CLIP text encoder (loss target only)"] == 4
    bare = save_official_checkpoint(tmp_path / "bare.pt", build_official_state_dict(cfg, include_unused=False))
    bare.with_suffix(".json").write_text(cfg.to_json())
    assert not any(what.startswith("SD1.5") for what in describe(bare)["not_read"])
    pack_path, _, _ = write_tiny_pack(tmp_path / "pack")
    assert describe(pack_path)["not_read"] == {}
    # found by a review: it could not tell whether an official file has its tokenizer beside it, and it read every
    # weight it reports (GBs for the official file): names, shapes and dtypes are enough
    assert describe(pt)["tokenizer_dir"] is None and describe(pack_path)["tokenizer_dir"] is None
    from support.tokenizer_fixture import build_tiny_tokenizer

    build_tiny_tokenizer(tmp_path / "data")
    assert describe(pt)["tokenizer_dir"] == str(tmp_path / "data")
    import kosmosg_core.checkpoint as checkpoint_module

    real_load, reads = checkpoint_module.load_pt_state_dict, []
    monkeypatch.setattr(checkpoint_module, "load_pt_state_dict",
                        lambda *a, **k: reads.append(k.get("read", True)) or real_load(*a, **k))
    assert describe(pt)["parameters"] > 0 and reads == [False]


def test_open_clip_fused_attention_is_split():
    cfg = KosmosGConfig.tiny()
    model = random_kosmosg(cfg)
    sd = model.state_dict()
    prefix = "vision.resblocks.0.attn."
    fused = {"visual.transformer.resblocks.0.attn.in_proj_weight":
             torch.cat([sd[prefix + f"{p}_proj.weight"] for p in "qkv"]),
             "visual.transformer.resblocks.0.attn.in_proj_bias": torch.cat([sd[prefix + f"{p}_proj.bias"] for p in "qkv"])}
    renamed, _ = rename_official_state_dict(fused)
    for p in "qkv":
        assert torch.equal(renamed[prefix + f"{p}_proj.weight"], sd[prefix + f"{p}_proj.weight"])


def test_a_blocks_ts_attn_wins_over_its_unused_open_clip_attn_in_any_key_order():
    """A state dict saved from an official model built without --visual-pretrained holds each vision block's
    open_clip `attn` (unused by the forward) besides its `ts_attn`; both map onto one attention, and the one
    read last used to win."""
    cfg = KosmosGConfig.tiny()
    model = random_kosmosg(cfg)
    official = to_official_state_dict(model.state_dict())
    width = cfg.vision.width
    shapes = {"in_proj_weight": (3 * width, width), "in_proj_bias": (3 * width,), "out_proj.weight": (width, width),
              "out_proj.bias": (width,)}
    stale = {f"img_model.visual.transformer.resblocks.{block}.attn.{name}": torch.full(shape, 7.0)
             for block in range(cfg.vision.layers) for name, shape in shapes.items()}
    for ordered in ({**official, **stale}, {**stale, **official}):
        renamed, ignored = rename_official_state_dict(ordered)
        assert all(torch.equal(renamed[key], tensor) for key, tensor in model.state_dict().items())
        assert sorted(set(ignored) & set(stale)) == sorted(stale)


def test_sizes_inferred_from_shapes():
    cfg = head_dim_64_config()
    model = random_kosmosg(cfg)
    assert infer_config(model.state_dict()) == cfg
    official = KosmosGConfig.official()
    with torch.device("meta"):
        sd = KosmosG(official).state_dict()
    assert infer_config(sd) == official


def test_official_pt_without_sidecar_loads_by_inference(tmp_path):
    from support.tokenizer_fixture import build_tiny_tokenizer

    cfg = head_dim_64_config()
    model = random_kosmosg(cfg)
    torch.save({"model": to_official_state_dict(model.state_dict()), "args": None}, tmp_path / "retrained.pt")
    build_tiny_tokenizer(tmp_path / "tokenizer")
    loaded, tokenizer = load_model(tmp_path / "retrained.pt")
    assert loaded.cfg == cfg
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


@BOTH_OPENERS
def test_missing_and_unexpected_keys_are_named(tmp_path, open_checkpoint):
    pt, _, model = write_tiny_official(tmp_path)
    sd = to_official_state_dict(model.state_dict())
    del sd["gpt_model.decoder.layers.1.ffn.fc2.bias"]
    sd["img_connector.extra_gate"] = torch.zeros(3)
    torch.save({"model": sd}, pt)
    with pytest.raises(CheckpointError, match=r"1 missing tensor: decoder\.layers\.1\.ffn\.fc2\.bias; "
                                              r"1 unexpected tensor: connector\.extra_gate"):
        open_checkpoint(pt)


@BOTH_OPENERS
def test_shape_mismatch_with_sidecar_config(tmp_path, open_checkpoint):
    pt, _, model = write_tiny_official(tmp_path)
    cfg = KosmosGConfig.from_json(pt.with_suffix(".json").read_text())
    cfg.decoder.ffn_width *= 2
    pt.with_suffix(".json").write_text(cfg.to_json())
    with pytest.raises(CheckpointError, match=r"decoder\.layers\.0\.ffn\.fc1\.weight has shape"):
        open_checkpoint(pt)


def test_pack_is_lazy_and_exact(tmp_path):
    path, _, model = write_tiny_pack(tmp_path)
    cfg, tensors, tokenizer = read_checkpoint(path)
    assert tokenizer is not None and cfg == model.cfg
    loaded, _ = load_model(path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    # training-only branches are never written
    cfg_recon = KosmosGConfig.from_dict(model.cfg.to_dict())
    cfg_recon.aligner.with_reconstruction = True
    cfg_recon.decoder.dropout = cfg_recon.aligner.dropout = 0.1
    cfg_recon.decoder.gradient_checkpointing = True
    trained = random_kosmosg(cfg_recon)
    out = save_pack_checkpoint(trained, None, tmp_path / "from-stage2.safetensors")
    saved_cfg, tensors, _ = read_checkpoint(out)
    assert saved_cfg == model.cfg  # the file records the inference form of the config
    assert (saved_cfg.aligner.with_reconstruction, saved_cfg.decoder.dropout, saved_cfg.aligner.dropout,
            saved_cfg.decoder.gradient_checkpointing) == (False, 0.0, 0.0, False)
    assert not any(k.startswith(("aligner.decoder_query", "aligner.decoder.", "aligner.decoder_proj.")) for k in tensors)


def test_pack_write_is_atomic(tmp_path, monkeypatch):
    path, _, model = write_tiny_pack(tmp_path)
    before = path.read_bytes()
    import safetensors.torch

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # killed mid-write
    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_pack_checkpoint(model, None, path, dtype=torch.float16)
    assert path.read_bytes() == before  # the good file was never replaced


def test_a_symlinked_official_checkpoint_finds_its_config_and_tokenizer_beside_the_target(tmp_path):
    """`ln -s .../checkpoint_final.pt ComfyUI/models/kosmosg/`: the sidecar config and data/ tokenizer sit
    beside the target, not the link (the model loaded with shape-inferred heads, or no tokenizer was found)."""
    path, _, model = write_tiny_official(tmp_path / "release")
    models = tmp_path / "models"
    models.mkdir()
    link = models / "kosmosg-official.pt"
    link.symlink_to(path)
    loaded, tokenizer = load_model(link)
    assert loaded.cfg.to_dict() == model.cfg.to_dict() and tokenizer.vocab_size == model.cfg.decoder.vocab_size
    (models / "data").mkdir()  # a folder beside the link wins over the target's (the user put it there)
    for name in ("sentencepiece.bpe.model", "dict.txt"):
        (models / "data" / name).symlink_to(path.parent / "data" / name)
    assert load_model(link)[1].source.startswith(str(models / "data"))


def test_paths_too_long_for_the_file_system_are_typed_errors(tmp_path):
    """exists() itself raised on these: a bare OSError ("File name too long") instead of the typed error naming the
    input and the fix. (The CLI's flags: test_cli.)"""
    from kosmosg_core.files import PATH_MAX
    from kosmosg_core.pipeline import KosmosGPipeline

    pack, _, _ = write_tiny_pack(tmp_path)
    deep = tmp_path.joinpath(*["d" * 200] * (PATH_MAX // 200 + 1), "x.pt")
    for load, error, message in [
        (lambda: load_model(tmp_path / ("c" * 300 + ".pt")), CheckpointNotFoundError,
         r"^Kosmos-G checkpoint .*\.\.\.c+\.pt: the name is longer than the file system allows \(303 bytes, limit "
         r"255\); rename the file\.$"),
        (lambda: KosmosGPipeline.from_checkpoint(tmp_path / ("e" * 256) / "x.pt"), CheckpointNotFoundError,
         r"the name of its folder e+\.\.\. is longer than the file system allows \(256 bytes, limit 255\); rename "
         r"the folder\.$"),
        (lambda: read_checkpoint(deep), CheckpointNotFoundError,
         rf"the path is longer than the OS allows \(\d+ bytes, limit {PATH_MAX - 1}\); move the file to a shorter path\.$"),
        (lambda: load_model(pack, tokenizer_dir=tmp_path / ("t" * 300)), TokenizerError,
         r"^Tokenizer folder .*: the name is longer than the file system allows \(300 bytes, limit 255\); rename the "
         r"folder\.$"),
    ]:
        with pytest.raises(error, match=message):
            load()


def test_a_checkpoint_name_near_the_limit_finds_its_config_and_tokenizer(tmp_path):
    """A 255-byte checkpoint_name.pt is fine, but <name>.json (the sidecar config) and <name>-tokenizer/ looked
    for beside it are over the limit: looking for them raised OSError instead of moving on to data/ and
    kosmosg_config.json."""
    path, _, model = write_tiny_official(tmp_path, name="short.pt")
    near_limit = path.rename(tmp_path / ("n" * 252 + ".pt"))
    path.with_suffix(".json").rename(tmp_path / "kosmosg_config.json")
    loaded, tokenizer = load_model(near_limit)
    assert loaded.cfg.to_dict() == model.cfg.to_dict() and tokenizer.source.startswith(str(tmp_path / "data"))


def test_official_tensors_inference_ignores_are_never_read(tmp_path, monkeypatch):
    """The official checkpoint also holds the SD1.5 U-Net and VAE (GBs): the loader skips their bytes."""
    from kosmosg_core import safe_unpickle

    path, _, model = write_tiny_official(tmp_path)
    state = torch.load(path, weights_only=False)
    state["model"]["diffusion_unet.unet.conv_in.weight"] = torch.zeros(1024, 1024)  # 4 MiB
    state["model"]["vae.encoder.conv_in.weight"] = torch.zeros(512, 1024)  # 2 MiB
    torch.save(state, path)
    read = []
    original = safe_unpickle._Archive._read

    def counting(self, name, nbytes=None, limit=None):
        data = original(self, name, nbytes, limit)
        read.append(len(data))
        return data

    monkeypatch.setattr(safe_unpickle._Archive, "_read", counting)
    loaded, _ = load_model(path)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert sum(read) < weights + 2**20  # the model's own tensors and the pickle, not the 6 MiB U-Net + VAE
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


@BOTH_OPENERS
@pytest.mark.parametrize("damage", ["missing", "short"])
def test_a_pt_whose_storage_record_is_missing_or_short_is_refused(tmp_path, open_checkpoint, damage):
    """From a review: the lazy open accepted these (the load refused them, mid-encode); the zip directory tells
    each record's size without reading it."""
    import zipfile

    pt, _, _ = write_tiny_official(tmp_path)
    with zipfile.ZipFile(pt) as source:
        entries = [(info, source.read(info)) for info in source.infolist()]
    victim = max((info for info, _ in entries if "/data/" in info.filename), key=lambda info: info.file_size)
    damaged = tmp_path / "damaged.pt"
    with zipfile.ZipFile(damaged, "w", zipfile.ZIP_STORED) as out:
        for info, data in entries:
            if info.filename == victim.filename:
                if damage == "missing":
                    continue
                data = data[:len(data) // 2]
            out.writestr(info.filename, data)
    (tmp_path / "damaged.json").write_text(pt.with_suffix(".json").read_text())
    message = "lacks the record" if damage == "missing" else "the pickle needs"
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(damaged)


@BOTH_OPENERS
def test_a_weight_of_a_dtype_torch_cannot_cast_is_refused_by_name(tmp_path, open_checkpoint):
    """From a review: a float4 weight passed as floating point and failed in the cast with torch's bare
    NotImplementedError, no file named."""
    from kosmosg_core.checkpoint import state_dict_mismatch

    expected = {"w": torch.zeros(2, 2)}
    assert state_dict_mismatch(expected, {"w": torch.empty(2, 2, dtype=torch.float8_e4m3fn)}) is None
    uncastable = next(d for d in (getattr(torch, "float4_e2m1fn_x2", None), torch.bits8) if d is not None)
    given = {"w": torch.empty(2, 2, dtype=uncastable, device="meta")}
    if given["w"].is_floating_point():
        assert state_dict_mismatch(expected, given) == \
            f"tensor w holds {uncastable} values, which this PyTorch cannot convert to the model's dtype"
    else:  # this torch calls it no floating point type at all
        assert "but the model expects floating point ones" in state_dict_mismatch(expected, given)
    pack, _, _ = write_tiny_pack(tmp_path)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(pack), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["decoder.layer_norm.weight"] = tensors["decoder.layer_norm.weight"].to(torch.float8_e4m3fnuz)
    save_file(tensors, str(pack), metadata)
    opened = open_checkpoint(pack)[0]  # the model, or the config the lazy open reads
    assert getattr(opened, "cfg", opened).decoder.width > 0  # an FNUZ float8 weight opens on both paths


def test_inspect_reads_the_config_and_tokenizer_but_no_weight(tmp_path, monkeypatch):
    """What a lazy pipeline opens: the official .pt's config inferred from its shapes, a pack's from its metadata,
    the tokenizers; not one tensor's bytes."""
    import safetensors

    from kosmosg_core import safe_unpickle
    from support.tokenizer_fixture import build_tiny_tokenizer

    cfg = head_dim_64_config()
    torch.save({"model": to_official_state_dict(random_kosmosg(cfg).state_dict())}, tmp_path / "retrained.pt")
    build_tiny_tokenizer(tmp_path / "tokenizer")
    pack, _, packed_model = write_tiny_pack(tmp_path / "pack")
    real_safe_open = safetensors.safe_open

    class NoWeightReads:  # safe_open, refusing to read any tensor but the tokenizer's bytes
        def __init__(self, *args, **kwargs):
            self.file = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def get_tensor(self, key):
            assert key.startswith("tokenizer."), f"read {key}"
            return self.file.get_tensor(key)

        def __getattr__(self, name):
            return getattr(self.file, name)

    def refuse(self, lazy):
        raise AssertionError(f"read {lazy!r}")

    monkeypatch.setattr(safe_unpickle._Archive, "materialize", refuse)
    monkeypatch.setattr(safetensors, "safe_open", NoWeightReads)
    inferred, tokenizer = inspect_checkpoint(tmp_path / "retrained.pt")
    assert inferred == cfg and tokenizer.source.startswith(str(tmp_path / "tokenizer"))
    assert inspect_checkpoint(pack)[0] == packed_model.cfg
    with pytest.raises(AssertionError, match="read"):  # the stand-ins do refuse reads
        load_model(pack)


def test_checkpoint_files_name_what_loading_reads(tmp_path):
    """An official .pt: itself, its sidecar config, its tokenizer files; a pack holding its tokenizer: itself; a
    pack without one: itself and the tokenizer found beside it."""
    from kosmosg_core.checkpoint import checkpoint_files

    pt, tok_dir, model = write_tiny_official(tmp_path / "official")
    assert checkpoint_files(pt) == [pt, pt.with_suffix(".json"), tok_dir / "sentencepiece.bpe.model", tok_dir / "dict.txt"]
    pack, _, _ = write_tiny_pack(tmp_path / "pack")
    assert checkpoint_files(pack) == [pack]
    bare = tmp_path / "official" / "bare.safetensors"
    save_pack_checkpoint(model, None, bare)
    found = checkpoint_files(bare)
    assert found[0] == bare and [p.name for p in found[1:]] == ["sentencepiece.bpe.model", "dict.txt"]
    with pytest.raises(CheckpointNotFoundError):
        checkpoint_files(tmp_path / "none.pt")


def test_a_record_claiming_more_bytes_than_the_file_is_refused_before_reading(tmp_path):
    """A small .pt whose zip directory claims a 4 GiB record: a one-line error before any allocation (it was
    a MemoryError with a 128 GiB claim)."""
    import zipfile

    from kosmosg_core.safe_unpickle import load_pt_state_dict

    path = tmp_path / "claims.pt"
    torch.save({"model": {"w": torch.ones(4)}}, path)
    with zipfile.ZipFile(path) as archive:
        record = next(n for n in archive.namelist() if "/data/" in n)
    raw = bytearray(path.read_bytes())
    entry = raw.find(b"PK\x01\x02")  # the central directory's entries
    while entry != -1:  # set the record's uncompressed size (offset 24) in its central directory entry
        name_length = int.from_bytes(raw[entry + 28:entry + 30], "little")
        if raw[entry + 46:entry + 46 + name_length].decode() == record:
            raw[entry + 24:entry + 28] = (0xFFFFFFF0).to_bytes(4, "little")
        entry = raw.find(b"PK\x01\x02", entry + 4)
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=f"record '{record}' claims 4294967280 bytes in a .*-byte file"):
        load_pt_state_dict(path, key="model")


@BOTH_OPENERS
@pytest.mark.parametrize("part, field, value, message", [
    ("decoder", "heads", 0, "DecoderConfig.heads = 0: expected a whole number from 1"),
    ("vision", "patch_size", 0, "VisionConfig.patch_size = 0"),
    ("decoder", "layers", "4", "DecoderConfig.layers = '4'"),
    ("decoder", "width", 2**40, "DecoderConfig.width = 1099511627776"),
    ("decoder", "layers", 100000, "expected a whole number from 1 to 1024"),  # was minutes of model building
    ("aligner", "dropout", float("nan"), "AlignerConfig.dropout = nan"),
    ("decoder", "scale_embedding", 1, "expected true or false"),
    ("vision", "mlp_ratio", 1e308, "vision MLP width 32 x 1e"),  # found by fuzzing: was an OverflowError
])
def test_a_pack_with_a_damaged_config_is_one_clear_error(tmp_path, part, field, value, message, open_checkpoint):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    path, _, _ = write_tiny_pack(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(metadata["config"])
    config[part][field] = value
    save_file(tensors, str(path), {**metadata, "config": json.dumps(config)})
    with pytest.raises(CheckpointError, match=f"embedded config is missing or invalid .*{message}"):
        open_checkpoint(path)



@BOTH_OPENERS
@pytest.mark.parametrize("config_json", ["[]", "null", "64", '"x"'])
def test_a_config_that_is_not_a_json_object_is_one_clear_error(tmp_path, config_json, open_checkpoint):
    """Found by fuzzing: it was a bare AttributeError ('list' object has no attribute 'get')."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path, _, _ = write_tiny_pack(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), {**metadata, "config": config_json})
    with pytest.raises(CheckpointError, match="embedded config is missing or invalid .*expected a JSON object"):
        open_checkpoint(path)
    pt, tok_dir, _ = write_tiny_official(tmp_path / "official")
    pt.with_suffix(".json").write_text(config_json)
    with pytest.raises(CheckpointError, match=r"checkpoint_final\.json is not a valid Kosmos-G config: .*JSON object"):
        open_checkpoint(pt, tok_dir)


@BOTH_OPENERS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int16])
def test_a_pack_whose_tokenizer_tensor_is_not_bytes_is_one_clear_error(tmp_path, dtype, open_checkpoint):
    """Found by fuzzing: a bfloat16 tokenizer tensor was a bare TypeError (numpy cannot hold it)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path, _, _ = write_tiny_pack(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    data = tensors["tokenizer.dict_txt"]
    tensors["tokenizer.dict_txt"] = data[:len(data) // 2 * 2].view(dtype)  # the same bytes, another dtype
    save_file(tensors, str(path), metadata)
    with pytest.raises(CheckpointError, match=f"{path.name}: tensor tokenizer.dict_txt holds {dtype} values"):
        open_checkpoint(path)

def test_state_dict_mismatch_names_what_differs():
    from kosmosg_core.checkpoint import state_dict_mismatch

    expected = {"a.w": torch.zeros(2, 3), "a.b": torch.zeros(2), "recon.w": torch.zeros(1)}
    assert state_dict_mismatch(expected, {"a.w": torch.ones(2, 3), "a.b": torch.ones(2), "recon.w": torch.ones(1)}) is None
    assert state_dict_mismatch(expected, {"a.w": torch.ones(2, 3), "a.b": torch.ones(2)}, allow_missing=("recon.",)) is None
    assert state_dict_mismatch(expected, {"x": torch.ones(1)}) == \
        "3 missing tensors: a.b, a.w, recon.w; 1 unexpected tensor: x"
    assert state_dict_mismatch(expected, {"a.w": torch.ones(3, 2), "a.b": torch.ones(2), "recon.w": torch.ones(1)}) == \
        "tensor a.w has shape (3, 2) but the model expects (2, 3)"
    assert state_dict_mismatch(expected, {"a.w": torch.ones(2, 3, dtype=torch.int32), "a.b": torch.ones(2),
                                          "recon.w": torch.ones(1)}) == \
        "tensor a.w holds torch.int32 values but the model expects floating point ones"


@BOTH_OPENERS
@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64])
def test_a_pack_with_a_non_float_weight_is_one_clear_error(tmp_path, dtype, open_checkpoint):
    """Found by fuzzing: an integer weight was a bare RuntimeError from load_state_dict; a complex one loaded and
    failed in the first encode."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path, _, _ = write_tiny_pack(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["decoder.layer_norm.weight"] = tensors["decoder.layer_norm.weight"].to(dtype)
    save_file(tensors, str(path), metadata)
    with pytest.raises(CheckpointError, match=f"{path.name} does not match .*: tensor decoder.layer_norm.weight holds "
                                              f"{dtype} values but the model expects floating point ones"):
        open_checkpoint(path)


def test_convert_keeps_the_files_dtype_unless_asked(tmp_path):
    from kosmosg_core.checkpoint import convert_official
    from safetensors import safe_open
    from support.official_checkpoint import build_official_state_dict, save_official_checkpoint

    pt, tok_dir, _ = write_tiny_official(tmp_path)
    cfg = KosmosGConfig.from_json(pt.with_suffix(".json").read_text())
    save_official_checkpoint(pt, build_official_state_dict(cfg, dtype=torch.float16))  # as the release (fp16)

    def float_dtypes(path):
        with safe_open(str(path), framework="pt") as f:
            return {f.get_slice(k).get_dtype() for k in f.keys() if not k.startswith("tokenizer.")}

    assert float_dtypes(convert_official(pt, tmp_path / "kept.safetensors", tok_dir)) == {"F16"}
    assert float_dtypes(convert_official(pt, tmp_path / "fp32.safetensors", tok_dir, dtype=torch.float32)) == {"F32"}



def test_convert_writes_weights_that_share_memory_in_the_pt(tmp_path):
    """Found by fuzzing: two weights saved as one tensor (one storage in the .pt) loaded, but convert failed with
    safetensors' bare RuntimeError ("Some tensors share memory")."""
    from kosmosg_core.checkpoint import convert_official

    pt, tok_dir, model = write_tiny_official(tmp_path)
    sd = to_official_state_dict(model.state_dict())
    sd["aligner.encoder.layer_norm.weight"] = sd["aligner.encoder.layer_norm.bias"]  # same shape, one storage
    torch.save({"model": sd}, pt)
    out = convert_official(pt, tmp_path / "converted.safetensors", tok_dir)
    _, tensors, _ = read_checkpoint(out)
    assert torch.equal(tensors["aligner.encoder.layer_norm.weight"], model.state_dict()["aligner.encoder.layer_norm.bias"])

@BOTH_OPENERS
def test_a_checkpoint_with_only_extra_tensors_is_refused_by_name(tmp_path, open_checkpoint):
    pt, _, model = write_tiny_official(tmp_path)
    sd = to_official_state_dict(model.state_dict())
    sd["img_connector.extra_gate"] = torch.zeros(3)  # nothing missing: only one tensor too many
    torch.save({"model": sd}, pt)
    with pytest.raises(CheckpointError, match=r": 1 unexpected tensor: connector\.extra_gate\. Use a complete"):
        open_checkpoint(pt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_nbytes_is_what_the_weights_take(dtype):
    """What ComfyUI's memory manager is told the Loader's model takes, before its weights are read."""
    from kosmosg_core.bench import SIZES
    from kosmosg_core.checkpoint import model_nbytes

    cfg = SIZES["tiny"]()
    model = KosmosG(cfg).to(dtype)
    assert model_nbytes(cfg, dtype) == sum(t.numel() * t.element_size() for t in model.state_dict().values())
