"""The official-format fixture builder: right names/shapes, faithful fairseq file, usable numbers."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from kosmosg_core.checkpoint import rename_official_state_dict
from kosmosg_core.config import KosmosGConfig
from kosmosg_core.model import KosmosG
from kosmosg_core.safe_unpickle import load_pt_state_dict
from support.official_checkpoint import (
    build_official_state_dict,
    official_tensor_specs,
    save_official_checkpoint,
)

# Shapes of checkpoint_final.pt, copied from the fact sheet (spec section 1.1), for the official config.
OFFICIAL_SHAPES = {
    "gpt_model.decoder.embed_tokens.weight": (64007, 2048),
    "gpt_model.decoder.output_projection.weight": (64007, 2048),
    "gpt_model.decoder.embed_positions._float_tensor": (1,),
    "gpt_model.decoder.self_attn_sope.scale": (32,),
    "gpt_model.decoder.layers.23.self_attn.q_proj.weight": (2048, 2048),
    "gpt_model.decoder.layers.0.self_attn.inner_attn_ln.bias": (2048,),
    "gpt_model.decoder.layers.0.ffn.fc1.weight": (8192, 2048),
    "gpt_model.decoder.layers.0.ffn.ffn_layernorm.weight": (8192,),
    "gpt_model.decoder.layers.0.ffn.fc2.weight": (2048, 8192),
    "gpt_model.decoder.layers.0.final_layer_norm.weight": (2048,),
    "gpt_model.decoder.layer_norm.bias": (2048,),
    "img_model.visual.conv1.weight": (1024, 3, 14, 14),
    "img_model.visual.class_embedding": (1024,),
    "img_model.visual.positional_embedding": (257, 1024),
    "img_model.visual.ln_pre.weight": (1024,),
    "img_model.visual.transformer.resblocks.23.ts_attn.out_proj.weight": (1024, 1024),
    "img_model.visual.transformer.resblocks.0.mlp.c_fc.weight": (4096, 1024),
    "img_model.visual.transformer.resblocks.0.mlp.c_proj.weight": (1024, 4096),
    "img_model.visual.ln_post.bias": (1024,),
    "img_connector.dense.weight": (2048, 1024),
    "img_connector.latent_query": (64, 2048),
    "img_connector.x_attn.k_proj.weight": (2048, 2048),
    "aligner.encoder_proj.embed_tokens.weight": (768, 2048),
    "aligner.encoder_proj.embed_tokens.bias": (768,),
    "aligner.encoder_proj.embed_positions.weight": (32768, 768),
    "aligner.encoder_proj.layers.11.ffn.fc1.weight": (3072, 768),
    "aligner.encoder_proj.layer_norm.weight": (768,),
    "aligner.encoder_query": (77, 768),
    "aligner.encoder.layers.11.encoder_attn.v_proj.weight": (768, 768),
    "aligner.encoder.layers.0.encoder_attn_layer_norm.weight": (768,),
    "aligner.encoder.layer_norm.weight": (768,),
}
STAGE2_SHAPES = {
    "aligner.decoder_query": (32768, 768),
    "aligner.decoder_proj.embed_positions.weight": (32768, 768),
    "aligner.decoder_proj.output_projection.weight": (2048, 768),
    "aligner.decoder.layers.11.encoder_attn.q_proj.weight": (768, 768),
}


def test_official_names_and_shapes_match_the_fact_sheet():
    specs = official_tensor_specs(KosmosGConfig.official(), include_unused=False)
    for name, shape in OFFICIAL_SHAPES.items():
        assert specs[name][0] == shape, name
    # what the sheet says is NOT in the file
    absent = ("attn.in_proj_weight", "img_model.visual.proj", "layernorm_embedding", "encoder_attn.inner_attn_ln",
              "aligner.encoder.embed_positions", "aligner.encoder.output_projection", "gpt_model.decoder.version")
    assert not [n for n in specs if any(a in n for a in absent)]
    assert not [n for n in specs if n.startswith("gpt_model.") and "encoder_attn" in n]
    assert sum(n.startswith("gpt_model.decoder.layers.") and n.endswith("q_proj.weight") for n in specs) == 24
    assert sum(n.startswith("aligner.encoder.layers.") and n.endswith("encoder_attn.q_proj.weight") for n in specs) == 12
    stage2 = official_tensor_specs(KosmosGConfig.official(), stage2=True, include_unused=False)
    for name, shape in STAGE2_SHAPES.items():
        assert stage2[name][0] == shape, name
    assert any(n.startswith("aligner.clip_encoder.") for n in stage2)


@pytest.mark.parametrize("stage2", [False, True])
def test_keys_map_one_to_one_onto_the_model(stage2):
    cfg = KosmosGConfig.tiny()
    cfg.aligner.with_reconstruction = stage2
    official = build_official_state_dict(cfg, seed=0, stage2=stage2)
    ours, ignored = rename_official_state_dict(official, keep_reconstruction=stage2)
    model_state = KosmosG(cfg).state_dict()
    assert set(ours) == set(model_state)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in model_state.items()}
    assert all(n.startswith(("gpt_model.decoder.output_projection", "gpt_model.decoder.embed_positions",
                             "gpt_model.decoder.self_attn_sope", "diffusion_unet.", "vae.", "aligner.clip_encoder."))
               for n in ignored)


def test_tied_head_and_initialisation():
    cfg = KosmosGConfig.tiny()
    sd = build_official_state_dict(cfg, seed=0)
    assert sd["gpt_model.decoder.output_projection.weight"] is sd["gpt_model.decoder.embed_tokens.weight"]
    ln_weight = sd["gpt_model.decoder.layers.0.self_attn_layer_norm.weight"]
    assert not torch.allclose(ln_weight, torch.ones_like(ln_weight)) and (ln_weight - 1).abs().max() < 0.6
    assert sd["gpt_model.decoder.layers.0.self_attn_layer_norm.bias"].abs().min() > 0
    fc1 = sd["gpt_model.decoder.layers.0.ffn.fc1.weight"]
    assert abs(fc1.std().item() * cfg.decoder.width ** 0.5 - 1) < 0.1  # std ~ 1/sqrt(fan_in)
    # every tensor distinct (no accidental reuse of the same random values)
    assert len({t.sum().item() for n, t in sd.items() if t.numel() > 8 and "output_projection" not in n}) == \
        len([n for n, t in sd.items() if t.numel() > 8 and "output_projection" not in n])
    again, other = build_official_state_dict(cfg, seed=0), build_official_state_dict(cfg, seed=1)
    assert all(torch.equal(again[k], v) for k, v in sd.items())
    assert not torch.equal(other["aligner.encoder_query"], sd["aligner.encoder_query"])
    half = build_official_state_dict(cfg, seed=0, dtype=torch.float16)
    assert {t.dtype for t in half.values()} == {torch.float16}
    assert "diffusion_unet.unet.conv_in.weight" in sd
    assert not any(n.startswith(("diffusion_unet.", "vae.")) for n in build_official_state_dict(cfg, include_unused=False))


def test_random_weights_give_order_one_activations():
    cfg = KosmosGConfig.tiny()
    ours, _ = rename_official_state_dict(build_official_state_dict(cfg, seed=0))
    model = KosmosG(cfg).eval()
    model.load_state_dict(ours, strict=True)
    slots = cfg.image_token_slots
    ids = torch.tensor([[0, 5, 6, 7] + [64] * slots + [8, 9]])
    image_mask = torch.zeros_like(ids, dtype=torch.bool)
    image_mask[0, 4:4 + slots] = True
    pixels = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model.mllm_hidden(ids, image_mask, model.encode_images(pixels))
        context = model(ids, image_mask, pixel_values=pixels)
    assert context.shape == (1, cfg.aligner.num_queries, cfg.aligner.width)
    for tensor in (hidden, context):
        assert torch.isfinite(tensor).all() and 0.1 < tensor.std().item() < 10
    # the context depends on the image (the connector / vision weights take part)
    with torch.no_grad():
        other = model(ids, image_mask, pixel_values=torch.zeros_like(pixels))
    assert not torch.allclose(context, other)


def test_saved_file_is_a_faithful_fairseq_checkpoint(tmp_path):
    """Plain torch.load on our own (trusted) fixture: the structure the safe loader must cope with."""
    from omegaconf import DictConfig

    sd = build_official_state_dict(KosmosGConfig.tiny(), seed=0, dtype=torch.float16)
    path = save_official_checkpoint(tmp_path / "checkpoint_final.pt", sd)
    state = torch.load(path, weights_only=False)
    assert set(state) == {"args", "cfg", "model", "criterion", "optimizer_history", "task_state", "extra_state",
                          "last_optimizer_state"}
    assert isinstance(state["cfg"], DictConfig) and state["cfg"].model._name == "kosmosg_xl"
    assert state["args"] is None and isinstance(state["model"], collections.OrderedDict)
    assert all(torch.equal(state["model"][k], v) for k, v in sd.items())
    embed, head = state["model"]["gpt_model.decoder.embed_tokens.weight"], state["model"]["gpt_model.decoder.output_projection.weight"]
    assert embed.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()
    assert state["optimizer_history"][-1]["optimizer_name"] == "FairseqAdam"
    assert isinstance(state["extra_state"]["best"], np.floating)
    adam = state["last_optimizer_state"]
    first = adam["state"][0]
    assert first["exp_avg"].dtype == torch.float32 and first["exp_avg"].shape == sd["gpt_model.decoder.embed_tokens.weight"].shape
    assert adam["param_groups"][0]["params"] == list(range(len(adam["state"])))

    container = save_official_checkpoint(tmp_path / "container.pt", sd, cfg_format="container")
    assert type(torch.load(container, weights_only=False)["cfg"]) is dict
    stripped = save_official_checkpoint(tmp_path / "stripped.pt", sd, with_training_state=False)
    assert set(torch.load(stripped, weights_only=True)) == {"model"}
    for file in (path, container, stripped):
        loaded = load_pt_state_dict(file)
        assert all(torch.equal(loaded[k], v) for k, v in sd.items())
