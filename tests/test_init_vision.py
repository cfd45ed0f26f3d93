"""Starting the vision encoder from a transformers CLIP tower (official stage 1 starts from CLIP ViT-L/14).

The converter is exact: a random tiny HF CLIPVisionModel and our VisionEncoder loaded through it give
the same tokens (HF's last_hidden_state, then post_layernorm on every token and L2-normalisation, as
ours does). Then `--init-vision` on stage 1: the vision weights start from the tower, the frozen ones
stay equal to it, and a tower that does not fit is refused by name.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from kosmosg_core.clip_vision import convert_hf_clip_vision_state_dict, load_hf_clip_vision
from kosmosg_core.config import KosmosGConfig
from kosmosg_core.errors import CheckpointError
from kosmosg_core.vision import VisionEncoder
from support.train_fixtures import common_args, make_env
from train.common.checkpointing import load_checkpoint

TINY_VISION = KosmosGConfig.tiny().vision  # 32 px, 8 px patches, 32 wide, 2 layers, 2 heads


def tiny_clip_vision(seed: int = 0, model: str = "vision", **changes):
    """A random HF CLIPVisionModel (or CLIPModel) shaped like TINY_VISION, every tensor perturbed so
    LayerNorms and biases are not at their identity init."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    sizes = dict(hidden_size=TINY_VISION.width, intermediate_size=4 * TINY_VISION.width,
                 num_hidden_layers=TINY_VISION.layers, num_attention_heads=TINY_VISION.heads,
                 image_size=TINY_VISION.image_size, patch_size=TINY_VISION.patch_size, hidden_act="quick_gelu")
    sizes.update(changes)
    torch.manual_seed(seed)
    if model == "clip":
        hf = CLIPModel(CLIPConfig(vision_config=sizes, text_config=dict(
            hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)))
    else:
        hf = CLIPVisionModel(CLIPVisionConfig(**sizes))
    with torch.no_grad():
        for parameter in hf.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return hf.eval()


def save_tower(hf, folder, layout: str = "safetensors") -> str:
    """save_pretrained's layouts: one safetensors file, shards + index, or a pytorch_model.bin."""
    if layout == "bin":
        folder.mkdir(parents=True)
        hf.config.to_json_file(str(folder / "config.json"))
        torch.save(hf.state_dict(), folder / "pytorch_model.bin")
    else:
        hf.save_pretrained(str(folder), max_shard_size="40KB" if layout == "sharded" else "5GB")
    return str(folder)


def hf_tokens(hf_vision, pixels):
    """HF tokens put through our ending: post_layernorm on every token, then L2-normalise. [N, 1+P, W]"""
    hidden = hf_vision(pixel_values=pixels).last_hidden_state  # [N, 1+P, W], before post_layernorm
    return F.normalize(hf_vision.post_layernorm(hidden), dim=-1)


def converted(hf) -> dict:
    return convert_hf_clip_vision_state_dict(hf.state_dict())


def test_tower_trained_on_other_pixel_normalisation_sees_the_same_input(tmp_path):
    """The nano tower was trained on pixels * 2 - 1 (its preprocessor_config.json says mean = std = 0.5):
    loaded into our encoder, which is fed CLIP-normalised pixels, it computes what it computed in training."""
    from kosmosg_core.config import CLIP_MEAN, CLIP_STD
    from train.nano.text_encoder import save_vision_preprocessor

    hf = tiny_clip_vision(seed=3)
    folder = save_tower(hf, tmp_path / "tower")
    pixels01 = torch.rand(2, 3, TINY_VISION.image_size, TINY_VISION.image_size)
    clip_pixels = (pixels01 - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    plain = VisionEncoder(TINY_VISION).eval()
    load_hf_clip_vision(plain, folder)  # no preprocessor_config.json: CLIP normalisation assumed
    save_vision_preprocessor(tmp_path / "tower", image_size=TINY_VISION.image_size)
    folded = VisionEncoder(TINY_VISION).eval()
    load_hf_clip_vision(folded, folder)
    with torch.no_grad():
        expected = hf_tokens(hf, pixels01 * 2 - 1)  # what the tower saw in training
        assert torch.allclose(folded(clip_pixels), expected, atol=1e-5)
        assert not torch.allclose(plain(clip_pixels), expected, atol=1e-3)  # unfolded, it sees other inputs


@pytest.mark.parametrize("model,layout", [("vision", "safetensors"), ("vision", "sharded"), ("vision", "bin"),
                                          ("clip", "safetensors")])
def test_converted_tower_gives_the_same_tokens(tmp_path, model, layout):
    hf = tiny_clip_vision(seed=1, model=model)
    folder = save_tower(hf, tmp_path / "tower", layout)
    if layout == "sharded":
        assert (tmp_path / "tower" / "model.safetensors.index.json").is_file()
    ours = VisionEncoder(TINY_VISION).eval()
    load_hf_clip_vision(ours, folder)

    hf_vision = hf if model == "vision" else hf.vision_model  # a CLIPModel holds a CLIPVisionModel
    pixels = torch.randn(3, 3, TINY_VISION.image_size, TINY_VISION.image_size)  # [N, 3, S, S]
    with torch.no_grad():
        expected, got = hf_tokens(hf_vision, pixels), ours(pixels)
    assert got.shape == (3, TINY_VISION.num_tokens, TINY_VISION.width)
    assert (got - expected).abs().max() < 1e-5
    assert (got - F.normalize(expected + 0.01, dim=-1)).abs().max() > 1e-3  # the comparison can fail


def test_converter_accepts_every_prefix_and_refuses_unknown_keys():
    hf = tiny_clip_vision()
    without = converted(hf)  # transformers 5 saves CLIPVisionModel without a prefix
    with_prefix = convert_hf_clip_vision_state_dict({"vision_model." + k: v for k, v in hf.state_dict().items()})
    in_clip = convert_hf_clip_vision_state_dict(tiny_clip_vision(model="clip").state_dict())  # + text tower
    assert set(with_prefix) == set(without) == set(in_clip) == set(VisionEncoder(TINY_VISION).state_dict())
    assert torch.equal(with_prefix["resblocks.1.mlp.c_fc.weight"], hf.encoder.layers[1].mlp.fc1.weight)
    with pytest.raises(CheckpointError, match="Unknown CLIP vision tensor 'vision_model.proj'"):
        convert_hf_clip_vision_state_dict({**hf.state_dict(), "vision_model.proj": torch.zeros(1)})


@pytest.mark.parametrize("changes,message", [
    (dict(num_attention_heads=4), "num_attention_heads 4 != vision.heads 2"),
    (dict(hidden_size=64, intermediate_size=256), "hidden_size 64 != vision.width 32; intermediate_size 256"),
    (dict(patch_size=4), "patch_size 4 != vision.patch_size 8"),
    (dict(image_size=64), "image_size 64 != vision.image_size 32"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'.*QuickGELU"),
])
def test_a_tower_that_does_not_fit_is_refused_by_name(tmp_path, changes, message):
    folder = save_tower(tiny_clip_vision(**changes), tmp_path / "tower")
    with pytest.raises(CheckpointError, match=message):
        load_hf_clip_vision(VisionEncoder(TINY_VISION), folder)


def test_a_folder_without_a_tower_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf_clip_vision(VisionEncoder(TINY_VISION), tmp_path)
    tiny_clip_vision().config.to_json_file(str(tmp_path / "config.json"))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf_clip_vision(VisionEncoder(TINY_VISION), tmp_path)


# --- --init-vision in training ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("init_vision"))


@pytest.fixture(scope="module")
def tower(env):
    hf = tiny_clip_vision(seed=2)
    return hf, save_tower(hf, env.root / "tower")


@pytest.fixture(scope="module")
def stage1_run(env, tower):
    """One stage-1 step from a fresh model with --init-vision."""
    from train import stage1

    out = env.root / "stage1"
    stage1.main(common_args(env, out, steps=1, save_every=1) + ["--init-vision", tower[1]])
    return out


def test_stage1_starts_the_vision_encoder_from_the_tower(env, tower, stage1_run):
    hf, _ = tower
    assert json.loads((env.root / "model.json").read_text())["vision"]["width"] == TINY_VISION.width
    trained = load_checkpoint(stage1_run)["model"]
    frozen_changed, trained_changed = [], []
    for name, tensor in converted(hf).items():
        same = torch.equal(trained["vision." + name], tensor)
        is_trainable = name.startswith((f"resblocks.{TINY_VISION.layers - 1}.", "ln_post."))
        (trained_changed if is_trainable else frozen_changed).append(not same)
    assert len(frozen_changed) > 10 and not any(frozen_changed)  # frozen blocks: the CLIP weights, untouched
    assert all(trained_changed)  # last block + ln_post: started from CLIP, moved by one step


def test_init_vision_overrides_the_init_checkpoints_vision(env, stage1_run):
    from train.loop import LoopConfig
    from train.model_init import build_kosmosg, load_tokenizer

    other = tiny_clip_vision(seed=3)
    cfg = LoopConfig(init_checkpoint=str(stage1_run), init_vision=save_tower(other, env.root / "other-tower"))
    model = build_kosmosg(cfg, load_tokenizer(env.tokenizer))
    checkpoint = load_checkpoint(stage1_run)["model"]
    for name, tensor in converted(other).items():
        assert torch.equal(model.vision.state_dict()[name], tensor), name
    for name, tensor in model.decoder.state_dict().items():
        assert torch.equal(tensor, checkpoint["decoder." + name]), name  # the rest still from the checkpoint


def test_stage1_refuses_a_tower_that_does_not_fit(env, tmp_path):
    from train import stage1

    folder = save_tower(tiny_clip_vision(num_hidden_layers=3), tmp_path / "deep-tower")
    with pytest.raises(ValueError, match="num_hidden_layers 3 != vision.layers 2"):
        stage1.main(common_args(env, tmp_path / "run", steps=1) + ["--init-vision", folder])
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    # a folder that is not there: said so, naming the flag and where the nano configs' tower comes from
    with pytest.raises(CheckpointError, match=r"--init-vision: CLIP vision folder .*absent-tower not found; .*"
                                              r"python -m train\.nano\.train_text_encoder writes"):
        stage1.main(common_args(env, tmp_path / "run", steps=1) + ["--init-vision", str(tmp_path / "absent-tower")])
