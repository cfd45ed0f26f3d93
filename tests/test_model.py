"""Model parts on tiny configs: shapes named per dimension, masks, batching invariances, config round trip."""

import math

import pytest
import torch

from kosmosg_core.config import PAD_ID, KosmosGConfig
from kosmosg_core.decoder import sinusoidal_positions
from kosmosg_core.model import KosmosG


def random_model(cfg: KosmosGConfig, seed: int = 0) -> KosmosG:
    torch.manual_seed(seed)
    model = KosmosG(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.2 if p.ndim > 1 else 0.05)
            if name.endswith("weight") and p.ndim == 1:  # LayerNorm gains near 1
                p.add_(1.0)
    return model


@pytest.fixture(scope="module")
def cfg():
    return KosmosGConfig.tiny()


@pytest.fixture(scope="module")
def model(cfg):
    return random_model(cfg)


def test_official_config_numbers():
    cfg = KosmosGConfig.official()
    assert (cfg.decoder.layers, cfg.decoder.width, cfg.decoder.ffn_width, cfg.decoder.heads) == (24, 2048, 8192, 32)
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.num_tokens) == (224, 14, 257)
    assert cfg.connector.num_queries == 64
    assert (cfg.aligner.encoder_layers, cfg.aligner.decoder_layers, cfg.aligner.width, cfg.aligner.num_queries) == (12, 12, 768, 77)
    assert cfg.decoder.vocab_size == 64007
    assert cfg.max_prompt_tokens == 2048  # the decoder's limit; the aligner's table holds 32766 positions
    # every LayerNorm eps is the official 1e-5 (too small an effect for the parity tolerance to see)
    assert cfg.vision.layer_norm_eps == cfg.decoder.layer_norm_eps == cfg.aligner.layer_norm_eps == 1e-5
    tiny = KosmosGConfig.tiny().to_dict()
    for part in ("vision", "decoder", "aligner"):
        tiny[part]["layer_norm_eps"] = 1e-3  # not torch's default: every LayerNorm must take its part's eps
    model = KosmosG(KosmosGConfig.from_dict(tiny))
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-3}


def test_max_prompt_tokens_is_the_tighter_of_decoder_and_aligner():
    cfg = KosmosGConfig.from_dict({"decoder": {"max_positions": 300}, "aligner": {"max_positions": 100}})
    assert cfg.max_prompt_tokens == 98  # aligner positions start at row 2
    model = KosmosG(KosmosGConfig.from_dict({**KosmosGConfig.tiny().to_dict(), "aligner": {
        **KosmosGConfig.tiny().aligner.__dict__, "max_positions": 12}})).eval()
    states = torch.randn(1, 10, model.cfg.decoder.width)
    model.aligner.encoder_proj(states)  # 10 tokens fit positions 2..11
    with pytest.raises(ValueError, match="11 tokens but its position table holds 10"):
        model.aligner.encoder_proj(torch.randn(1, 11, model.cfg.decoder.width))


def test_config_json_round_trip_and_validation(cfg):
    assert KosmosGConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="not divisible"):
        KosmosGConfig.from_dict({"decoder": {"width": 30, "heads": 4}})
    with pytest.raises(ValueError, match=r"Unknown fields at the top of the model config: \['scale_embedding'\]; it "
                                         r"takes vision, connector, decoder, aligner, image_token_slots"):
        KosmosGConfig.from_dict({"scale_embedding": False})  # a review found it ignored: decoder.scale_embedding
    with pytest.raises(ValueError, match="Unknown DecoderConfig fields"):
        KosmosGConfig.from_dict({"decoder": {"widht": 64}})


def test_sinusoidal_positions_follow_fairseq():
    ids = torch.tensor([[0, 5, 6, PAD_ID]])
    table = sinusoidal_positions(ids, 8)  # [1, 4, 8]
    half = 4
    freqs = [math.exp(-i * math.log(10000) / (half - 1)) for i in range(half)]
    for t, p in enumerate([2, 3, 4]):  # non-pad positions start at padding_idx + 1 = 2
        expected = [math.sin(p * f) for f in freqs] + [math.cos(p * f) for f in freqs]
        assert torch.allclose(table[0, t], torch.tensor(expected), atol=1e-6)
    assert torch.all(table[0, 3] == 0)  # the pad row is zero


def test_shapes(model, cfg):
    N, S = 3, cfg.vision.image_size
    tokens = model.vision(torch.randn(N, 3, S, S))
    assert tokens.shape == (N, cfg.vision.num_tokens, cfg.vision.width)
    assert torch.allclose(tokens.norm(dim=-1), torch.ones(N, cfg.vision.num_tokens), atol=1e-5)  # L2-normalised
    embeds = model.encode_images(torch.randn(N, 3, S, S))
    assert embeds.shape == (N, cfg.connector.num_queries, cfg.decoder.width)
    B, T = 2, 9
    ids = torch.randint(4, cfg.decoder.vocab_size, (B, T))
    hidden = model.decoder(ids)
    assert hidden.shape == (B, T, cfg.decoder.width)
    assert model.decoder.lm_logits(hidden).shape == (B, T, cfg.decoder.vocab_size)
    cond = model.aligner(hidden, ids.eq(PAD_ID))
    assert cond.shape == (B, cfg.aligner.num_queries, cfg.aligner.width)


def test_decoder_is_causal(model, cfg):
    ids = torch.randint(4, cfg.decoder.vocab_size, (1, 8))
    changed = ids.clone()
    changed[0, 5] = (ids[0, 5] + 1) % cfg.decoder.vocab_size
    a, b = model.decoder(ids), model.decoder(changed)
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6)
    assert not torch.allclose(a[:, 5:], b[:, 5:], atol=1e-3)


def test_right_padding_does_not_change_the_condition(model, cfg):
    ids = torch.randint(4, cfg.decoder.vocab_size, (1, 6))
    mask = torch.zeros_like(ids, dtype=torch.bool)
    padded = torch.cat([ids, torch.full((1, 5), PAD_ID)], dim=1)
    padded_mask = torch.zeros_like(padded, dtype=torch.bool)
    assert torch.allclose(model(ids, mask), model(padded, padded_mask), atol=1e-5)


def test_image_embeddings_fill_masked_slots_in_order(model, cfg):
    Q = cfg.image_token_slots
    ids = torch.tensor([[0, 7] + [cfg.decoder.vocab_size - 4] * (2 * Q) + [9]])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, 2:2 + 2 * Q] = True
    pixels = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
    direct = model(ids, mask, pixel_values=pixels)
    via_embeds = model(ids, mask, image_embeds=model.encode_images(pixels))
    swapped = model(ids, mask, pixel_values=pixels.flip(0))
    assert torch.allclose(direct, via_embeds, atol=1e-6)
    assert not torch.allclose(direct, swapped, atol=1e-4)  # order of images matters
    # slot k of the text holds row k of the images' embeddings: image 1's Q rows, then image 2's (found by a
    # mutation review: flipping the embeddings passed the checks above, which swap both sides alike)
    embeds = model.encode_images(pixels).flatten(0, 1)  # [2Q, D]
    with torch.no_grad():
        embedded = model.decoder.embed(ids, embeds, mask)  # [1, T, D]
        text_only = model.decoder.embed(ids, None, None)
    positions = text_only - model.decoder.embed_scale * model.decoder.embed_tokens(ids)
    slots = (embedded - positions)[0, 2:2 + 2 * Q] / model.decoder.embed_scale
    assert torch.allclose(slots, embeds, atol=1e-5)
    assert torch.equal(embedded[0, :2], text_only[0, :2]) and torch.equal(embedded[0, -1], text_only[0, -1])
    with pytest.raises(ValueError, match="image slots"):
        model(ids, mask, image_embeds=model.encode_images(pixels[:1]))


def test_vision_trainable_parameters_are_last_block_and_ln_post(model, cfg):
    names = model.vision.trainable_parameter_names()
    assert names and all(n.startswith((f"resblocks.{cfg.vision.layers - 1}.", "ln_post.")) for n in names)


def test_reconstruction_branch_shapes():
    cfg = KosmosGConfig.tiny()
    cfg.aligner.with_reconstruction = True
    model = random_model(cfg)
    hidden = torch.randn(2, 7, cfg.decoder.width)
    cond = model.aligner(hidden)
    assert model.aligner.reconstruct(cond, 7).shape == (2, 7, cfg.decoder.width)


def test_aligner_fresh_init_follows_torchscale():
    """Stage 2 starts from this: random queries (official randn; zero queries made all 77 outputs equal
    and learned about half as fast), PyTorch's Linear init in the attention (torchscale's xavier reset_parameters
    is never called by the official code), subLN depth scaling of fc/out_proj/v_proj. `reset_attention_xavier`
    gives the xavier init the shipped nano's stage 2 started from."""
    from kosmosg_core.aligner import Aligner
    from kosmosg_core.config import AlignerConfig

    torch.manual_seed(0)
    cfg = AlignerConfig(width=64, heads=4, ffn_width=96, encoder_layers=2, decoder_layers=3, max_positions=40,
                        with_reconstruction=True, reconstruction_layers=2)
    aligner = Aligner(cfg, mllm_width=32)
    for queries in (aligner.encoder_query, aligner.decoder_query):
        assert 0.9 < queries.std().item() < 1.1 and queries.mean(1).abs().max() < 0.6  # rows differ
    linear_bound = 64 ** -0.5  # PyTorch's Linear: U(+-1/sqrt(fan_in))
    query_layer = aligner.encoder.layers[0]
    assert 0.9 * linear_bound < query_layer.self_attn.q_proj.weight.abs().max() <= linear_bound
    assert query_layer.encoder_attn.out_proj.bias.abs().max() > 0  # not zeroed
    # subLN scaling: v_proj of the query stack (torchscale Decoder, enc-dec) by sqrt(log(3 * decoder_layers));
    # cross-attention keeps the plain init
    scale = math.sqrt(math.log(3 * 3))
    assert query_layer.self_attn.v_proj.weight.abs().max() > 0.9 * linear_bound * scale
    assert query_layer.encoder_attn.v_proj.weight.abs().max() <= linear_bound + 1e-6
    encoder_scale = math.sqrt(math.log(3 * 3) * math.log(2 * 2) / 3)
    assert aligner.encoder_proj.layers[0].self_attn.out_proj.weight.abs().max() <= linear_bound * encoder_scale + 1e-6
    # every query produces its own output from the start
    out = aligner(torch.randn(2, 5, 32))
    assert (out[:, 0] - out[:, 1]).abs().mean() > 0.1

    aligner.reset_attention_xavier()  # the earlier init: xavier attention, zero out_proj biases, the same scaling
    xavier_bound = math.sqrt(6 / (64 + 64))
    assert 0.9 * xavier_bound * 2 ** -0.5 < query_layer.self_attn.q_proj.weight.abs().max() <= \
        xavier_bound * 2 ** -0.5 + 1e-6
    assert torch.all(query_layer.encoder_attn.out_proj.bias == 0)
    assert query_layer.self_attn.v_proj.weight.abs().max() > 0.9 * xavier_bound * 2 ** -0.5 * scale
    assert query_layer.self_attn.v_proj.weight.abs().max() <= xavier_bound * 2 ** -0.5 * scale + 1e-6
    assert query_layer.encoder_attn.v_proj.weight.abs().max() <= xavier_bound * 2 ** -0.5 + 1e-6


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = KosmosG(KosmosGConfig.tiny()).train()  # dropout 0: the two runs are comparable
    ids = torch.randint(5, 90, (2, 9))
    image_mask = torch.zeros(2, 9, dtype=torch.bool)

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        model.cfg.decoder.gradient_checkpointing = checkpointing
        model.aligner.set_gradient_checkpointing(checkpointing)
        model(ids, image_mask).square().sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and any(k.startswith("decoder.") for k in plain)
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


def test_a_skeleton_on_the_meta_device_skips_the_embeddings_init_and_a_real_model_keeps_it(cfg):
    """Checkpoints are built on the meta device before their tensors are assigned: `normal_` there imported
    PyTorch's compiler stack (~1.5 s per process, most of a lazy open). On the CPU the embeddings initialise as
    nn.Embedding does (N(0, 1), the padding row zero)."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, torch\nfrom kosmosg_core.model import KosmosG\nfrom kosmosg_core.config import KosmosGConfig\n"
            "with torch.device('meta'):\n    KosmosG(KosmosGConfig())\nprint('torch._dynamo' in sys.modules)")
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo, check=True,
                         env={"PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "False", out.stderr
    torch.manual_seed(0)
    model = KosmosG(cfg)
    weight = model.decoder.embed_tokens.weight
    assert 0.8 < weight.std().item() < 1.2 and torch.all(weight[PAD_ID] == 0)
    assert 0.8 < model.aligner.encoder_proj.embed_positions.weight.std().item() < 1.2
