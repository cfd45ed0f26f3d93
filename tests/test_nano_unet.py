"""The narrow nano U-Net computes exactly what the 320-wide ComfyUI SD1.5 U-Net computes.

Without ComfyUI: padded norms equal torch's norms on zero-padded inputs, the narrow network equals
its own full-width instance loaded with the padded weights, padding round-trips and refuses
non-equivalent checkpoints. With ComfyUI (integration): its real ``UNetModel`` loads the padded
state dict with strict=True and gives the same output, and a checkpoint written by
``write_sd15_checkpoint`` is detected as SD1.5 and samples finite pixels.
"""

import pytest
import torch
import torch.nn.functional as F
from support.comfy_modules import import_comfy

from train.nano.sd15_format import read_sd15_checkpoint, write_sd15_checkpoint
from train.nano.taesd import TinyAutoencoder
from train.nano.unet import (
    ChannelLayout,
    NanoUNet,
    NanoUNetConfig,
    PaddedGroupNorm,
    PaddedLayerNorm,
    comfy_unet_config,
)

MAX_CHECKPOINT_BYTES = 60 * 1000 * 1000


def randomise_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-zero weights everywhere (the default init zeroes the residual outputs) with moderate
    activations: matrices N(0, 0.5 / sqrt(fan_in)), norm weights 1 + N(0, 0.1), biases N(0, 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if p.dim() > 1:
                p.copy_(noise * 0.5 / p[0].numel() ** 0.5)
            elif name.endswith("bias"):
                p.copy_(noise * 0.1)
            else:
                p.copy_(1 + noise * 0.1)
    return model


def example_inputs(batch: int = 2, dtype=torch.float32, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=gen).to(dtype)  # [B, 4, 8, 8]
    t = torch.tensor([17.0, 901.0][:batch])  # [B]
    context = torch.randn(batch, 77, 768, generator=gen).to(dtype)  # [B, 77, 768]
    return x, t, context


def zero_pad(x: torch.Tensor, positions: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = width
    out = x.new_zeros(shape)
    out.index_copy_(dim, positions, x)
    return out


# ------------------------------------------------------------------------- no ComfyUI needed


@pytest.mark.parametrize("real", [48, 64, 96])
@pytest.mark.parametrize("space", ["c", "c2"])
def test_padded_group_norm_equals_group_norm_of_zero_padded_input(real, space):
    layout = ChannelLayout(NanoUNetConfig(real_channels=real))
    positions, width = layout.positions(space), layout.padded(space)
    norm = PaddedGroupNorm(layout, space, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, len(positions), 8, 8, dtype=torch.float64) * 2 + 0.7
    weight = zero_pad(norm.weight.double(), positions, width, 0)
    bias = zero_pad(norm.bias.double(), positions, width, 0)
    expected = F.group_norm(zero_pad(x, positions, width, 1), 32, weight, bias, eps=1e-5)
    got = norm.double()(x)
    assert torch.allclose(got, expected[:, positions], atol=1e-12)
    # every padded channel is exactly zero after the norm, so the padded network stays padded
    mask = torch.ones(width, dtype=torch.bool)
    mask[positions] = False
    assert expected[:, mask].abs().max() == 0
    assert norm.uniform == (len(positions) % 32 == 0)  # both code paths are exercised


@pytest.mark.parametrize("real", [48, 320])
def test_padded_layer_norm_equals_layer_norm_of_zero_padded_input(real):
    layout = ChannelLayout(NanoUNetConfig(real_channels=real))
    positions = layout.positions("c")
    norm = PaddedLayerNorm(layout, "c").double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 64, real, dtype=torch.float64) + 0.3
    expected = F.layer_norm(
        zero_pad(x, positions, 320, 2), (320,), zero_pad(norm.weight, positions, 320, 0),
        zero_pad(norm.bias, positions, 320, 0), eps=1e-5,
    )
    assert torch.allclose(norm(x), expected[..., positions], atol=1e-12)


@pytest.mark.parametrize("real", [48, 64])
def test_narrow_equals_full_width_instance_with_padded_weights(real):
    narrow = randomise_(NanoUNet(real_channels=real))
    full = NanoUNet(NanoUNetConfig(real_channels=real).padded())
    padded_sd = narrow.to_padded_state_dict()
    full.load_state_dict(padded_sd, strict=True)
    assert padded_sd["input_blocks.0.0.weight"].shape == (320, 4, 3, 3)
    assert padded_sd["time_embed.0.weight"].shape == (1280, 320)
    assert padded_sd["input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight"].shape == (2560, 320)
    assert padded_sd["output_blocks.0.0.in_layers.0.weight"].shape == (640,)
    assert sum(v.numel() for v in padded_sd.values()) == 25_789_444

    x, t, context = example_inputs()
    with torch.no_grad():
        out_narrow, out_full = narrow(x, t, context), full(x, t, context)
    assert out_narrow.shape == (2, 4, 8, 8)
    assert out_narrow.abs().mean() > 0.1  # a real signal, not a zeroed network
    assert (out_narrow - out_full).abs().max() <= 1e-5

    narrow64, full64 = narrow.double(), full.double()
    x, t, context = example_inputs(dtype=torch.float64)
    with torch.no_grad():
        assert (narrow64(x, t, context) - full64(x, t, context)).abs().max() <= 1e-10


def test_padded_state_dict_round_trips_and_refuses_non_equivalent_weights():
    narrow = randomise_(NanoUNet(real_channels=64), seed=3)
    padded_sd = narrow.to_padded_state_dict()
    restored = NanoUNet.from_padded_state_dict(padded_sd, real_channels=64)
    for key, value in narrow.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key

    # a non-zero weight outside the real channels would make the padded network differ
    tampered = dict(padded_sd)
    tampered["middle_block.1.proj_in.weight"] = padded_sd["middle_block.1.proj_in.weight"].clone()
    tampered["middle_block.1.proj_in.weight"][1, 0] = 0.5  # position 1 is padding at 64 real channels
    with pytest.raises(ValueError, match="middle_block.1.proj_in.weight.*non-zero"):
        NanoUNet.from_padded_state_dict(tampered, real_channels=64)

    # a padded dict of another real width is refused by its padding, a narrow dict by its shapes
    with pytest.raises(ValueError, match="non-zero"):
        NanoUNet.from_padded_state_dict(randomise_(NanoUNet(real_channels=96)).to_padded_state_dict(), real_channels=64)
    with pytest.raises(ValueError, match="padded shape"):
        NanoUNet.from_padded_state_dict(narrow.state_dict(), real_channels=64)
    prefixed = {"model.diffusion_model." + k: v for k, v in padded_sd.items()}
    with pytest.raises(ValueError, match="without 'model.diffusion_model.'"):
        NanoUNet.from_padded_state_dict(prefixed, real_channels=64)


@pytest.mark.parametrize("bad", [dict(real_channels=60), dict(real_channels=0), dict(real_channels=352),
                                 dict(ff_inner_channels=2000)])
def test_config_rejects_widths_that_cannot_pad(bad):
    with pytest.raises(ValueError):
        NanoUNet(**bad)


def test_forward_broadcasts_a_scalar_timestep_and_rejects_bad_shapes():
    model = randomise_(NanoUNet(real_channels=48))
    x, _, context = example_inputs()
    with torch.no_grad():
        assert torch.equal(model(x, 250, context), model(x, torch.tensor([250.0, 250.0]), context))
        with pytest.raises(ValueError, match="context"):
            model(x, 250, context[..., :512])
        with pytest.raises(ValueError, match="timesteps"):
            model(x, torch.tensor([1.0, 2.0, 3.0]), context)


def test_config_round_trips_through_dict():
    cfg = NanoUNetConfig(real_channels=96, ff_inner_channels=256)
    assert NanoUNetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        NanoUNetConfig.from_dict({"real_channels": 64, "width": 3})


def test_default_init_predicts_zero_and_trains():
    """Zero-initialised residual outputs (LDM's zero_module) and a finite gradient step."""
    model = NanoUNet(real_channels=48)
    x, t, context = example_inputs()
    assert model(x, t, context).abs().max() == 0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    target = torch.randn_like(x)
    losses = []
    for _ in range(3):
        loss = F.mse_loss(model(x, t, context), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_write_checkpoint_refuses_narrow_or_prefixed_unet(tmp_path):
    narrow = NanoUNet(real_channels=64)
    ae = TinyAutoencoder()
    enc, dec = ae.taesd_encoder.state_dict(), ae.taesd_decoder.state_dict()
    with pytest.raises(ValueError, match="320"):
        write_sd15_checkpoint(tmp_path / "a.safetensors", narrow.state_dict(), enc, dec, 1.0, 0.0)
    prefixed = {"model.diffusion_model." + k: v for k, v in narrow.to_padded_state_dict().items()}
    with pytest.raises(ValueError, match="must not carry"):
        write_sd15_checkpoint(tmp_path / "b.safetensors", prefixed, enc, dec, 1.0, 0.0)
    with pytest.raises(ValueError, match="taesd_decoder_sd"):
        write_sd15_checkpoint(tmp_path / "c.safetensors", narrow.to_padded_state_dict(), enc, enc, 1.0, 0.0)
    with pytest.raises(ValueError, match="vae_scale"):
        write_sd15_checkpoint(tmp_path / "d.safetensors", narrow.to_padded_state_dict(), enc, dec, 0.0, 0.0)
    narrow_context = {k: (v[:, :512] if k.endswith("attn2.to_k.weight") else v)
                      for k, v in narrow.to_padded_state_dict().items()}
    with pytest.raises(ValueError, match="768-wide context"):
        write_sd15_checkpoint(tmp_path / "e.safetensors", narrow_context, enc, dec, 1.0, 0.0)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------- real ComfyUI


@pytest.mark.integration
@pytest.mark.parametrize("real", [48, 64])
def test_narrow_equals_comfyui_sd15_unet(real):
    import_comfy()
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    narrow = randomise_(NanoUNet(real_channels=real), seed=real)
    with torch.device("meta"):  # comfy ops skip init by design; every weight comes from our dict
        reference = UNetModel(**comfy_unet_config())
    reference.load_state_dict(narrow.to_padded_state_dict(), strict=True, assign=True)

    x, t, context = example_inputs()
    with torch.no_grad():
        expected = reference(x, timesteps=t, context=context, transformer_options={})
        got = narrow(x, t, context)
    assert got.abs().mean() > 0.1
    assert (got - expected).abs().max() <= 1e-5

    reference, narrow = reference.double(), narrow.double()
    x, t, context = example_inputs(dtype=torch.float64)
    with torch.no_grad():
        expected = reference(x, timesteps=t, context=context, transformer_options={})
        assert (narrow(x, t, context) - expected).abs().max() <= 1e-10


@pytest.mark.integration
def test_checkpoint_loads_in_comfyui_as_sd15_and_samples(tmp_path):
    comfy = import_comfy()
    import comfy.sample
    import comfy.supported_models

    torch.manual_seed(0)
    narrow = randomise_(NanoUNet(real_channels=64), seed=5)
    ae = TinyAutoencoder()
    path = write_sd15_checkpoint(
        tmp_path / "nano-sd15.safetensors", narrow.to_padded_state_dict(), ae.taesd_encoder.state_dict(),
        ae.taesd_decoder.state_dict(), vae_scale=0.7, vae_shift=0.1,
    )
    size = path.stat().st_size
    print(f"fp16 nano SD1.5 checkpoint: {size / 1e6:.2f} MB")
    assert size <= MAX_CHECKPOINT_BYTES

    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=False)[:3]
    config = model.model.model_config
    assert type(config) is comfy.supported_models.SD15
    assert config.unet_config["model_channels"] == 320
    assert config.unet_config["context_dim"] == 768
    assert config.unet_config["channel_mult"] == [1]
    assert clip is None
    assert type(vae.first_stage_model).__name__ == "TAESD"

    # ComfyUI's loaded U-Net computes our narrow network (weights rounded to fp16 on disk)
    stored = read_sd15_checkpoint(path)
    assert stored["vae_scale"] == pytest.approx(0.7, rel=1e-3)
    resumed = NanoUNet.from_padded_state_dict({k: v.float() for k, v in stored["unet"].items()}, real_channels=64)
    x, t, context = example_inputs(batch=1)
    with torch.no_grad():
        expected = model.model.diffusion_model(x, timesteps=t, context=context, transformer_options={})
        assert (resumed(x, t, context) - expected.float()).abs().max() <= 1e-5

    # sampling through ComfyUI's own KSampler path gives a finite 64x64 image
    conditioning = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(2))
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    samples = comfy.sample.sample(
        model, noise, 3, 5.0, "euler", "normal", [[conditioning, {}]], [[torch.zeros_like(conditioning), {}]],
        latent, seed=0, disable_pbar=True,
    )
    assert samples.shape == (1, 4, 8, 8) and torch.isfinite(samples).all()
    assert samples.abs().max() > 0
    pixels = vae.decode(samples)
    assert pixels.shape == (1, 64, 64, 3)
    assert torch.isfinite(pixels).all()


def test_fresh_residual_branches_start_at_identity():
    """LDM's zero_module: in a fresh NanoUNet every ResBlock's and SpatialTransformer's residual branch is
    zero, so a block with an identity skip returns its input h [B, C, H, W]."""
    model = NanoUNet(real_channels=48)
    h = torch.randn(2, 48, 8, 8, generator=torch.Generator().manual_seed(0))  # [B, C_real, H, W]
    emb = torch.randn(2, model.config.time_embed_real)
    context = torch.randn(2, 77, 768)
    with torch.no_grad():
        for block in (model.input_blocks[1], model.middle_block):
            assert torch.equal(block(h, emb, context), h)


def test_norm_epsilons_are_comfyuis():
    """ComfyUI's ResBlock / output GroupNorm use torch's default eps (1e-5), its SpatialTransformer norm
    1e-6 and its transformer LayerNorms torch's default: the narrow norms must use the same."""
    model = NanoUNet(real_channels=48)
    torch_default = torch.nn.GroupNorm(32, 320).eps
    assert torch_default == torch.nn.LayerNorm(320).eps == 1e-5
    resblock, transformer = model.middle_block[0], model.middle_block[1]
    assert resblock.in_layers[0].eps == resblock.out_layers[0].eps == model.out[0].eps == torch_default
    assert transformer.norm.eps == 1e-6
    block = transformer.transformer_blocks[0]
    assert block.norm1.eps == block.norm2.eps == block.norm3.eps == torch_default
