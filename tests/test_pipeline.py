"""KosmosGPipeline: encode / unconditional / batching / weights / cache, and every bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from kosmosg_core.errors import CheckpointError, CheckpointNotFoundError, DeviceError, ImageError, NonFiniteEncodingError, \
    PromptError, TokenizerError
from kosmosg_core.devices import resolve_device
from kosmosg_core.pipeline import KosmosGPipeline, read_prompt_images


@pytest.fixture(scope="module")
def pipe(pack):
    return KosmosGPipeline.from_checkpoint(pack[0])


def image(seed, size=(40, 30)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8))


def test_encode_shapes_and_determinism(pipe):
    cond = pipe.encode("a photo of <i> wearing <i> on the beach", [image(0), image(1)])
    assert cond.shape == (1, 77, 768) and cond.dtype == torch.float32
    again = pipe.encode("a photo of <i> wearing <i> on the beach", [image(0), image(1)])
    assert torch.equal(cond, again)
    swapped = pipe.encode("a photo of <i> wearing <i> on the beach", [image(1), image(0)])
    assert not torch.allclose(cond, swapped, atol=1e-4)


def test_unconditional_is_the_bos_only_encoding(pipe):
    uncond = pipe.encode_unconditional()
    assert uncond.shape == (1, 77, 768)
    assert uncond.abs().sum() > 0  # not zeros: the MLLM + aligner output for <s>
    assert torch.allclose(uncond, pipe.encode(""), atol=1e-6)  # "" prompt == <s> alone
    neg = pipe.encode_unconditional("blurry, low quality")
    assert not torch.allclose(uncond, neg, atol=1e-4)
    assert pipe.encode_unconditional(batch_size=3).shape == (3, 77, 768)


def test_batch_equals_one_at_a_time(pipe):
    prompts = ["a dog", "a photo of <i> on the beach at sunset with friends", "<i> next to <i>"]
    images = [[], [image(2)], [image(3), image(4)]]
    batch = pipe.encode(prompts, images)
    assert batch.shape == (3, 77, 768)
    for k, (p, imgs) in enumerate(zip(prompts, images)):
        assert torch.allclose(batch[k], pipe.encode(p, imgs)[0], atol=1e-5)


def test_big_batches_run_in_chunks_with_progress_during_the_work(pipe, monkeypatch):
    """40 prompts (more than PROMPT_CHUNK) with 40 new images (more than VISION_CHUNK): the same result as one at
    a time; progress fires once per image and per prompt, between the forwards (an interrupt stops the work);
    cached features own their storage (a view kept the whole batch's output alive)."""
    from kosmosg_core import pipeline as pipeline_module

    small = KosmosGPipeline(pipe.model, pipe.tokenizer, cache_size=64)
    prompts = [f"picture {k} of <i>" + " big" * (k % 5) for k in range(40)]
    images = [image(100 + k, (24, 24)) for k in range(40)]
    calls, forwards = [], []
    monkeypatch.setattr(small.model, "encode_images", lambda x, f=small.model.encode_images: forwards.append(len(x)) or f(x))
    batched = small.encode(prompts, [[img] for img in images], progress=lambda: calls.append(len(forwards)))
    assert len(calls) == 80 and max(forwards) <= pipeline_module.VISION_CHUNK and sum(forwards) == 40
    assert calls[0] < len(forwards)  # the first progress came before the last vision forward
    for k in (0, 17, 39):
        assert torch.allclose(batched[k], pipe.encode(prompts[k], [images[k]])[0], atol=1e-5)
    entry = next(iter(small._image_cache.values()))
    assert entry.untyped_storage().nbytes() == entry.numel() * entry.element_size()

    def interrupt():
        raise KeyboardInterrupt

    forwards.clear()
    small.clear_cache()
    with pytest.raises(KeyboardInterrupt):
        small.encode(prompts, [[img] for img in images], progress=interrupt)
    assert forwards == [pipeline_module.VISION_CHUNK]  # stopped after the first chunk


def test_image_weights(pipe):
    base = pipe.encode("a photo of <i>", [image(5)])
    assert torch.allclose(base, pipe.encode("a photo of <i>", [image(5)], image_weights=[1.0]), atol=0)
    assert not torch.allclose(base, pipe.encode("a photo of <i>", [image(5)], image_weights=[0.5]), atol=1e-4)
    with pytest.raises(PromptError, match=r"1 image\(s\) but 2 image weight\(s\)"):
        pipe.encode("a photo of <i>", [image(5)], image_weights=[1.0, 1.0])
    assert torch.equal(pipe.encode("a photo of <i>", image(5), image_weights=0.5),  # one image, one weight: no list
                       pipe.encode("a photo of <i>", [image(5)], image_weights=[0.5]))
    for bad in (float("nan"), float("inf"), "x", True):
        with pytest.raises(PromptError, match="is not a finite number"):
            pipe.encode("a photo of <i>", [image(5)], image_weights=[bad])
    # each weight scales its own image: weight 0 removes the second image, so which image that is does not matter
    kept = pipe.encode("<i> and <i>", [image(5), image(6)], image_weights=[1.0, 0.0])
    assert torch.allclose(kept, pipe.encode("<i> and <i>", [image(5), image(7)], image_weights=[1.0, 0.0]), atol=1e-6)
    assert not torch.allclose(kept, pipe.encode("<i> and <i>", [image(5), image(7)], image_weights=[0.0, 1.0]), atol=1e-4)
    for bad in (-0.5, 10.5):  # the range the node's weights input takes, checked by the core for every caller
        with pytest.raises(PromptError, match=r"Image weight .* \(prompt 0\) is outside 0..10"):
            pipe.encode("a photo of <i>", [image(5)], image_weights=[bad])
    pipe.encode("a photo of <i>", [image(5)], image_weights=[10])


def test_a_weight_written_in_the_prompt_is_the_weights_list(pipe):
    """`<i:0.5>` encodes as `<i>` with image weight 0.5, and multiplies with a weights list."""
    listed = pipe.encode("<i> and <i>", [image(5), image(6)], image_weights=[0.5, 1.0])
    written = pipe.encode("<i:0.5> and <i>", [image(5), image(6)])
    assert torch.equal(written, listed)
    assert torch.equal(pipe.encode("<i:1> and <i:1.0>", [image(5), image(6)]), pipe.encode("<i> and <i>", [image(5), image(6)]))
    both = pipe.encode("<i:0.5> and <i:2>", [image(5), image(6)], image_weights=[0.5, 0.5])
    assert torch.equal(both, pipe.encode("<i> and <i>", [image(5), image(6)], image_weights=[0.25, 1.0]))
    assert not torch.allclose(written, pipe.encode("<i> and <i>", [image(5), image(6)]), atol=1e-4)
    with pytest.raises(PromptError, match=r"Image weight 12 \(image 1: 4 written in the text x 3 given as its weight\)"):
        pipe.encode("<i:4>", [image(5)], image_weights=[3.0])
    with pytest.raises(PromptError, match="Placeholder 1 of the prompt, '<i:big>', has no weight"):
        pipe.encode("<i:big>", [image(5)])
    # checked before a model is needed (the CLI reads the prompt and its images before loading one)
    with pytest.raises(PromptError, match="Placeholder 1 of the prompt, '<i:big>', has no weight"):
        read_prompt_images("<i:big>", [image(5)])
    with pytest.raises(PromptError, match=r"Image weight 12 \(image 1: 4 written in the text x 3"):
        read_prompt_images("<i:4>", [image(5)], [3.0])
    assert len(read_prompt_images("<i:4>", [image(5)], [2.5])) == 1


def test_batch_shape_rules(pipe):
    """Lists that do not match the prompts are refused by count, never cut to the shortest (zip)."""
    with pytest.raises(PromptError, match="Got 3 prompts but 1 image weight lists"):
        pipe.encode(["a cat", "a dog", "a red <i>"], [[], [], [image(1)]], image_weights=[[]])
    with pytest.raises(PromptError, match="Got 2 prompts but 1 image weight lists"):
        pipe.encode(["a cat", "a dog"], None, image_weights=[[]])
    with pytest.raises(PromptError, match="Got 2 prompts but 1 image lists"):
        pipe.encode(["a <i>", "a dog"], [[image(1)]])
    with pytest.raises(PromptError, match="Got 2 prompts but a PngImageFile, not image lists|Got 2 prompts but a Image"):
        pipe.encode(["a <i>", "a dog"], image(1))
    with pytest.raises(PromptError, match="No prompts were given"):
        pipe.encode([])
    for bad in (None, 5, b"a cat"):
        with pytest.raises(PromptError, match="prompts must be a string or a list of strings|must be text"):
            pipe.encode(bad)
    # one image per prompt may be given without its own list
    assert torch.equal(pipe.encode(["a <i>", "b <i>"], [image(1), image(2)]),
                       pipe.encode(["a <i>", "b <i>"], [[image(1)], [image(2)]]))


def test_an_image_batch_counts_as_its_images(pipe):
    """A [B, H, W, C] batch in the images is B images (as `to_pil_images` reads it), for placeholders and weights."""
    tensors = [torch.from_numpy(np.asarray(image(k)).astype(np.float32) / 255.0) for k in (1, 2)]
    batch = torch.stack(tensors)  # [2, H, W, C]
    assert torch.equal(pipe.encode("<i> and <i>", [batch]), pipe.encode("<i> and <i>", tensors))
    assert torch.equal(pipe.encode("<i> and <i>", batch), pipe.encode("<i> and <i>", tensors))
    with pytest.raises(PromptError, match=r"1 <i> placeholder\(s\) but 2 image\(s\)"):
        pipe.encode("a <i>", [batch])


def test_text_that_is_not_unicode_is_refused(pipe):
    undecodable = b"a \xff cat".decode("utf-8", "surrogateescape")  # how Python hands undecodable argv bytes
    with pytest.raises(PromptError, match="not valid text"):
        pipe.encode(undecodable)
    with pytest.raises(PromptError, match="negative prompt holds bytes that are not valid text"):
        pipe.encode_unconditional(undecodable)


def test_unconditional_arguments_are_checked(pipe):
    with pytest.raises(PromptError, match="negative prompt must be text"):
        pipe.encode_unconditional(5)
    for bad in (0, -1, 2.0):
        with pytest.raises(PromptError, match="batch_size must be a whole number >= 1"):
            pipe.encode_unconditional(batch_size=bad)
    with pytest.raises(PromptError, match=r"The negative prompt is 8001 tokens long .*shorten the text\.$"):  # no images
        pipe.encode_unconditional("word " * 2000)


@pytest.mark.parametrize("cache_size", [0, 1])
def test_small_caches_still_encode(pipe, cache_size):
    small = KosmosGPipeline(pipe.model, pipe.tokenizer, cache_size=cache_size)
    assert torch.equal(small.encode_unconditional(), pipe.encode_unconditional())
    assert torch.equal(small.encode("<i> and <i>", [image(1), image(2)]), pipe.encode("<i> and <i>", [image(1), image(2)]))
    assert len(small._image_cache) <= cache_size and len(small._unconditional_cache) <= cache_size
    with pytest.raises(ValueError, match="cache_size must be a whole number >= 0"):
        KosmosGPipeline(pipe.model, pipe.tokenizer, cache_size=-1)


def test_vision_cache_is_content_keyed(pipe):
    pipe.clear_cache()
    calls = []
    original = pipe.model.encode_images
    pipe.model.encode_images = lambda px: (calls.append(px.shape[0]), original(px))[1]
    try:
        pipe.encode("<i> and <i>", [image(6), image(6)])  # same content twice -> one vision pass
        pipe.encode("<i>", [image(6).copy()])  # a different object, same pixels -> cached
    finally:
        pipe.model.encode_images = original
    assert calls == [1]


def test_unconditional_cache(pipe):
    """The negative is the same for every positive prompt: computed once per text, dropped by clear_cache."""
    pipe.clear_cache()
    calls = []
    original = pipe.model.forward
    pipe.model.forward = lambda *args, **kwargs: (calls.append(1), original(*args, **kwargs))[1]
    try:
        first = pipe.encode_unconditional()
        expected = first.clone()
        first.add_(1.0)  # the caller's tensor is its own: the cached value must not change
        again = pipe.encode_unconditional(batch_size=2)
        assert calls == [1]
        assert torch.equal(again[0], again[1]) and torch.equal(again[:1], expected)
        pipe.encode_unconditional("blurry")  # another text: computed
        pipe.encode_unconditional("blurry")
        assert calls == [1, 1]
        pipe.clear_cache()
        assert torch.equal(pipe.encode_unconditional(), again[:1])
        assert calls == [1, 1, 1]
        assert all(cond.device.type == "cpu" for cond in pipe._unconditional_cache.values())  # not in GPU memory
    finally:
        pipe.model.forward = original


def test_comfyui_image_tensor_input(pipe):
    pil = image(7)
    tensor = torch.from_numpy(np.asarray(pil).astype(np.float32) / 255.0)[None]  # [1, H, W, C] 0-1
    assert torch.allclose(pipe.encode("<i>", [tensor]), pipe.encode("<i>", [pil]), atol=1e-6)


def test_placeholder_mismatch(pipe):
    with pytest.raises(PromptError, match=r"2 <i> placeholder\(s\) but 1 image"):
        pipe.encode("<i> and <i>", [image(0)])
    with pytest.raises(PromptError, match=r"0 <i> placeholder\(s\) but 1 image"):
        pipe.encode("no placeholder", [image(0)])
    # counted before any image is read (decoding six big photos took 19 s and 5 GB before this error):
    with pytest.raises(PromptError, match=r"1 <i> placeholder\(s\) but 2 image"):
        pipe.encode("one <i>", ["/no/such/photo.jpg", torch.rand(1, 8, 8, 3)])


def test_prompt_too_long(pipe):
    with pytest.raises(PromptError, match=r"8001 tokens long .* at most 510 \(its aligner.s position table\); shorten"):
        pipe.encode("word " * 2000)


def test_unreadable_image(pipe, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ImageError, match="broken.png"):
        pipe.encode("<i>", [bad])


def test_bad_checkpoints(tmp_path, pack):
    with pytest.raises(CheckpointNotFoundError, match="not found"):
        KosmosGPipeline.from_checkpoint(tmp_path / "nope.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(pack[0].read_bytes()[: 5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        KosmosGPipeline.from_checkpoint(truncated)
    from safetensors.torch import save_file

    sd15 = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, str(sd15))
    with pytest.raises(CheckpointError, match=r"Stable Diffusion checkpoint \(model.diffusion_model.\* keys\), not Kosmos-G"):
        KosmosGPipeline.from_checkpoint(sd15)


def test_wrong_tokenizer(tmp_path, pack):
    from support.tokenizer_fixture import build_tiny_tokenizer

    other = build_tiny_tokenizer(tmp_path / "other", vocab_size=150)
    with pytest.raises(TokenizerError, match="checkpoint"):
        KosmosGPipeline.from_checkpoint(pack[0], tokenizer_dir=other)
    with pytest.raises(TokenizerError):
        KosmosGPipeline.from_checkpoint(pack[0], tokenizer_dir=tmp_path / "missing-dir")


def test_bad_dtype_and_device(pack):
    with pytest.raises(DeviceError, match="Unsupported dtype"):
        KosmosGPipeline.from_checkpoint(pack[0], dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            KosmosGPipeline.from_checkpoint(pack[0], device="cuda")
    with pytest.raises(DeviceError, match="Unknown device"):
        KosmosGPipeline.from_checkpoint(pack[0], device="gpu0")


@pytest.mark.parametrize("device", ["ipu", "hpu", "vulkan", "meta"])
def test_device_this_pytorch_cannot_use_is_refused_by_name(device):
    with pytest.raises(DeviceError, match=f"'{device}'"):
        resolve_device(device)


def test_other_backends_comfyui_runs_on_are_accepted_where_usable(monkeypatch):
    """DirectML ('privateuseone') / Ascend ('npu') users get ComfyUI's device; it is used when torch can."""
    from kosmosg_core import devices

    assert not devices.device_usable(torch.device("privateuseone"))  # no DirectML plugin here
    monkeypatch.setattr(devices, "device_usable", lambda device: True)  # as with the plugin installed
    assert resolve_device("privateuseone:0") == torch.device("privateuseone:0")
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_device_is_this_process_gpu_or_the_cpu(monkeypatch):
    """"auto" (train/'s default): the GPU of this process's LOCAL_RANK under accelerate / torchrun, else the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device("AUTO") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)


@pytest.mark.parametrize("dtype, poison, fix", [
    ("float16", 6e4, "float16 overflowed: load the model in bfloat16 or float32"),  # outputs past fp16's 65504
    ("float32", float("nan"), "weights may hold inf/NaN"),
])
def test_non_finite_encoding_is_an_error_not_black_images(pack, dtype, poison, fix):
    pipe = KosmosGPipeline.from_checkpoint(pack[0], dtype=dtype)
    assert torch.isfinite(pipe.encode("a photo of <i>", [image(9)])).all()
    with torch.no_grad():
        pipe.model.aligner.encoder.layer_norm.weight.fill_(poison)  # the last op before the output
    with pytest.raises(NonFiniteEncodingError, match=f"inf/NaN in {dtype}; .*{fix}"):
        pipe.encode("a photo of <i>", [image(9)])
    with pytest.raises(NonFiniteEncodingError):
        pipe.encode_unconditional()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_close_to_float32(pack, pipe, dtype):
    low = KosmosGPipeline.from_checkpoint(pack[0], dtype=dtype)
    ref = pipe.encode("a photo of <i>", [image(8)])
    out = low.encode("a photo of <i>", [image(8)])
    assert out.dtype == getattr(torch, dtype)
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.05, rel


def test_cached_image_features_belong_to_the_dtype_they_were_computed_in(pack):
    pipe = KosmosGPipeline.from_checkpoint(pack[0], pack_cpu_linears=False)
    pipe.encode("a photo of <i>", [image(8)])  # fp32 features cached
    pipe.model.to(torch.bfloat16)
    fresh = KosmosGPipeline.from_checkpoint(pack[0], dtype="bfloat16", pack_cpu_linears=False)
    assert torch.equal(pipe.encode("a photo of <i>", [image(8)]), fresh.encode("a photo of <i>", [image(8)]))


def test_the_cached_unconditional_encoding_belongs_to_its_model(pack):
    """Found by a mutation review: the in-memory unconditional cache keyed by the text alone passed every test."""
    pipe = KosmosGPipeline.from_checkpoint(pack[0], pack_cpu_linears=False)
    assert pipe.encode_unconditional("blurry").dtype == torch.float32  # cached
    pipe.model.to(torch.bfloat16)
    fresh = KosmosGPipeline.from_checkpoint(pack[0], dtype="bfloat16", pack_cpu_linears=False)
    again = pipe.encode_unconditional("blurry")
    assert again.dtype == torch.bfloat16 and torch.equal(again, fresh.encode_unconditional("blurry"))



def test_read_prompt_images_counts_and_reads_like_encode(tmp_path):
    """What the CLI checks before a model loads: a batch [B, H, W, C] is B images (as `encode` counts them), paths
    are decoded, and a wrong count or an unreadable file is the error encode would give."""
    batch = torch.rand(2, 8, 8, 3)
    pictures = read_prompt_images("<i> and <i>", [batch])
    assert [picture.size for picture in pictures] == [(8, 8), (8, 8)]
    with pytest.raises(PromptError, match="The prompt has 1 <i> placeholder"):
        read_prompt_images("<i>", [batch])
    path = tmp_path / "red.png"
    Image.new("RGB", (5, 4), (255, 0, 0)).save(path)
    (red,) = read_prompt_images("a <i>", [path])
    assert red.size == (5, 4) and red.getpixel((0, 0)) == (255, 0, 0)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(ImageError, match="Cannot read image file"):
        read_prompt_images("a <i>", [tmp_path / "broken.png"])
    assert read_prompt_images("text only", []) == []
    # one image given alone, not in a list (a PIL image; a batch tensor is still its images)
    assert [p.size for p in read_prompt_images("a <i>", Image.new("RGB", (3, 2)))] == [(3, 2)]
    assert len(read_prompt_images("<i> and <i>", batch)) == 2
    # image weights as encode checks them: one per image (a batch's images each count), each in 0..10
    assert len(read_prompt_images("<i> and <i>", [batch], [1.0, 0.5])) == 2
    with pytest.raises(PromptError, match=r"Prompt 0 has 2 image\(s\) but 1 image weight\(s\)"):
        read_prompt_images("<i> and <i>", [batch], [1.0])
    with pytest.raises(PromptError, match=r"Image weight 11 \(prompt 0\) is outside 0..10"):
        read_prompt_images("a <i>", [path], [11])
