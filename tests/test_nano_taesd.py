"""The nano TAESD autoencoder has ComfyUI's TAESD keys, shapes and encode/decode formulas."""


import pytest
import torch
from support.comfy_modules import import_comfy

from train.nano.taesd import SD15_LATENT_SCALE, TinyAutoencoder, fit_latent_scale_shift



def random_autoencoder(seed: int = 0, scale: float = 0.8, shift: float = -0.2) -> TinyAutoencoder:
    torch.manual_seed(seed)
    ae = TinyAutoencoder()
    with torch.no_grad():
        for p in ae.parameters():  # keep activations O(1) through 30+ convs
            p.mul_(0.7)
    ae.set_scale_shift(scale, shift)
    return ae


def test_shapes_and_parameter_count():
    ae = random_autoencoder()
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1  # [B, 3, H, W] in [-1, 1]
    latents = ae.encode(pixels)
    assert latents.shape == (2, 4, 8, 8)
    assert ae.decode(latents).shape == (2, 3, 64, 64)
    block = 3 * (64 * 64 * 9 + 64)  # three biased 3x3 convs
    stride_convs = 3 * 64 * 64 * 9  # bias-free down / up-scaling convs
    encoder = (3 * 9 * 64 + 64) + 10 * block + stride_convs + (64 * 9 * 4 + 4)
    decoder = (4 * 9 * 64 + 64) + 10 * block + stride_convs + (64 * 9 * 3 + 3)
    assert sum(p.numel() for p in ae.parameters()) == encoder + decoder == 2_445_063  # "2.45 M"
    assert ae.taesd_decoder[1].weight.shape == (64, 4, 3, 3)  # ComfyUI's TAESD detector key


def test_formulas_scale_shift_and_soft_clamp():
    ae = random_autoencoder(scale=0.5, shift=0.25)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        raw = ae.taesd_encoder(pixels * 0.5 + 0.5)
        assert torch.allclose(ae.encode(pixels), raw / 0.5 + 0.25)
        # decoding latents far outside +-3 equals decoding their soft-clamped values
        latents = torch.randn(1, 4, 8, 8) * 20
        after_clamp = torch.nn.Sequential(*list(ae.taesd_decoder)[1:])
        clamped = torch.tanh((latents - 0.25) * 0.5 / 3) * 3
        assert torch.allclose(ae.decode(latents), after_clamp(clamped) * 2 - 1, atol=1e-6)
        assert not torch.allclose(ae.decode(latents), after_clamp((latents - 0.25) * 0.5) * 2 - 1)
        unet = ae.encode_to_unet_space((pixels + 1) / 2)
        assert torch.allclose(unet, ae.encode(pixels) * SD15_LATENT_SCALE)
        decoded = ae.decode_from_unet_space(unet)
        assert decoded.min() >= 0 and decoded.max() <= 1
        assert torch.allclose(decoded, ((ae.decode(ae.encode(pixels)) + 1) / 2).clamp(0, 1), atol=1e-6)


def test_fit_latent_scale_shift_gives_unit_variance_unet_inputs():
    raw = torch.randn(64, 4, 8, 8) * 3.7 + 1.3
    scale, shift = fit_latent_scale_shift(raw)
    unet_inputs = SD15_LATENT_SCALE * (raw / scale + shift)
    assert unet_inputs.mean().abs() < 1e-5
    assert unet_inputs.std().item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="zero variance"):
        fit_latent_scale_shift(torch.ones(2, 4, 8, 8))
    with pytest.raises(ValueError, match="vae_scale"):
        TinyAutoencoder().set_scale_shift(0.0, 0.0)


@pytest.mark.integration
def test_state_dict_loads_into_comfyui_taesd_with_identical_outputs():
    comfy = import_comfy()
    from comfy.taesd.taesd import TAESD

    ae = random_autoencoder(seed=3)
    reference = TAESD()
    reference.load_state_dict(ae.state_dict(), strict=True)
    assert {k: v.shape for k, v in reference.state_dict().items()} == {k: v.shape for k, v in ae.state_dict().items()}

    latents = torch.randn(2, 4, 8, 8) * 2
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(ae.decode(latents), reference.decode(latents))
        assert torch.equal(ae.encode(pixels), reference.encode(pixels))
        assert ae.decode(latents).std() > 0.01  # a real signal

    # the whole ComfyUI VAE wrapper (IMAGE [B, H, W, 3] in [0, 1]) applies the same formulas
    vae = comfy.sd.VAE(sd=ae.state_dict())
    images = torch.rand(1, 64, 64, 3)
    with torch.no_grad():
        encoded = vae.encode(images)
        assert torch.allclose(encoded.float(), ae.encode(images.movedim(-1, 1) * 2 - 1), atol=1e-5)
        decoded = vae.decode(latents[:1])
        expected = ae.decode_from_unet_space(latents[:1] * SD15_LATENT_SCALE).movedim(1, -1)
        assert torch.allclose(decoded.float(), expected, atol=1e-5)


def test_decode_from_unet_space_clamps_pixels_to_0_1():
    """ComfyUI's VAEDecode clamps: a decoder whose raw output overshoots gives exactly 1 (or 0), never more."""
    ae = random_autoencoder()
    latents = torch.randn(1, 4, 8, 8) * 0.18  # [B, 4, h, w], U-Net space
    for bias, expected in ((5.0, 1.0), (-5.0, 0.0)):
        with torch.no_grad():
            ae.taesd_decoder[-1].bias.fill_(bias)  # raw decoder output ~ bias: pixels far outside [0, 1]
            pixels = ae.decode_from_unet_space(latents)
        assert pixels.shape == (1, 3, 64, 64)
        assert torch.equal(pixels, torch.full_like(pixels, expected))
