"""On a CUDA GPU: encodes on the GPU equal the CPU's in float32, fp16 / bf16 stay close to them, the CLI
encodes on the GPU, and a GPU pipeline keeps its caches per device.

Marked `cuda`: the CPU suites (scripts/test.sh) leave these out; scripts/device_checks.sh runs them
on a GPU machine. KOSMOSG_TEST_DEVICE=cpu runs the same checks on the CPU, which tests the tests
where no GPU is at hand."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from kosmosg_core.pipeline import KosmosGPipeline

DEVICE = os.environ.get("KOSMOSG_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.cuda

CASES = {  # name -> (prompt, number of images)
    "text-only": ("a photo of a dog on the beach", 0),
    "1-image": ("a photo of <i> on the beach", 1),
    "2-images": ("a photo of <i> wearing <i>", 2),
    "unconditional": ("", 0),
}


def image(seed, size=(48, 36)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def device():
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: run scripts/device_checks.sh on a GPU machine (or KOSMOSG_TEST_DEVICE=cpu)")
    return DEVICE


@pytest.fixture(scope="module")
def cpu_pipe(pack):
    return KosmosGPipeline.from_checkpoint(pack[0], device="cpu")


@pytest.fixture
def exact_float32():
    """TF32 off for the float32 comparison (cuDNN convolutions use it by default: ~1e-3 off)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def encode(pipe, case):
    prompt, n_images = CASES[case]
    if case == "unconditional":
        return pipe.encode_unconditional()
    return pipe.encode(prompt, [image(k) for k in range(n_images)])


@pytest.mark.parametrize("case", list(CASES))
def test_float32_on_the_device_equals_the_cpu(device, pack, cpu_pipe, exact_float32, case):
    pipe = KosmosGPipeline.from_checkpoint(pack[0], device=device)
    out = encode(pipe, case)
    assert out.device.type == torch.device(device).type and out.dtype == torch.float32
    assert torch.allclose(out.cpu(), encode(cpu_pipe, case), atol=1e-4)


def test_batch_on_the_device_equals_one_at_a_time(device, pack, exact_float32):
    pipe = KosmosGPipeline.from_checkpoint(pack[0], device=device)
    prompts = ["a dog", "a photo of <i> on the beach at sunset with friends", "<i> next to <i>"]
    images = [[], [image(2)], [image(3), image(4)]]
    batch = pipe.encode(prompts, images)
    for k, (prompt, prompt_images) in enumerate(zip(prompts, images)):
        assert torch.allclose(batch[k], pipe.encode(prompt, prompt_images)[0], atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_the_device_is_close_to_float32(device, pack, cpu_pipe, dtype):
    pipe = KosmosGPipeline.from_checkpoint(pack[0], device=device, dtype=dtype)
    for case in CASES:
        out = encode(pipe, case)
        assert out.dtype == getattr(torch, dtype) and torch.isfinite(out).all()
        ref = encode(cpu_pipe, case)
        rel = (out.float().cpu() - ref).norm() / ref.norm()
        assert rel < 0.05, (case, rel)


def test_cli_encodes_on_the_device_in_float16(device, pack, cpu_pipe, tmp_path):
    image_path = tmp_path / "subject.png"
    image(7).save(image_path)
    out = tmp_path / "cond.safetensors"
    result = subprocess.run([sys.executable, "-m", "kosmosg_core", "encode", "--checkpoint", str(pack[0]),
                             "--prompt", "a photo of <i> on the beach", "--image", str(image_path), "--out", str(out),
                             "--dtype", "float16", "--device", device], capture_output=True, text=True, timeout=600,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    cond = load_file(str(out))["cond"]
    ref = cpu_pipe.encode("a photo of <i> on the beach", [Image.open(image_path)])
    assert cond.shape == (1, 77, 768)
    assert (cond - ref).norm() / ref.norm() < 0.05


def test_device_pipeline_caches(device, pack):
    """Vision features and unconditional encodings are kept on the CPU (the GPU's memory belongs to the model) and
    returned on the model's device; the unconditional cache is per device and dtype, so a model moved to the CPU
    (cast to bf16 when testing on the CPU) computes it again."""
    pipe = KosmosGPipeline.from_checkpoint(pack[0], device=device, pack_cpu_linears=False)
    pipe.encode("a photo of <i>", [image(5)])
    assert all(features.device.type == "cpu" for features in pipe._image_cache.values())
    calls = []
    original = pipe.model.forward
    pipe.model.forward = lambda *args, **kwargs: (calls.append(1), original(*args, **kwargs))[1]
    try:
        first = pipe.encode_unconditional()
        assert pipe.encode_unconditional().device == first.device == pipe.device and calls == [1]
        assert all(cond.device.type == "cpu" for cond in pipe._unconditional_cache.values())
        moved = {"dtype": torch.bfloat16} if device == "cpu" else {"device": "cpu"}
        pipe.model.to(**moved)
        again = pipe.encode_unconditional()
        assert calls == [1, 1]
        assert again.device.type == "cpu" and again.dtype == moved.get("dtype", torch.float32)
        assert (again.float() - first.float().cpu()).norm() / first.norm() < 0.05
    finally:
        pipe.model.forward = original


def test_disk_cache_on_the_device(device, pack, tmp_path):
    """A restarted GPU pipeline reads its encodings back without running the model, on its device; a model parked on
    the CPU that computes on the GPU (ComfyUI's offload: compute_device) is keyed by the GPU, so it reads the GPU's
    entries, and a prompt whose features come from the cache while the model is still parked, then runs its
    decoder on the GPU, ends on the GPU (features read on the CPU move with it)."""
    from kosmosg_core.disk_cache import DiskCache

    cache = DiskCache(tmp_path / "cache")
    pipe = KosmosGPipeline.from_checkpoint(pack[0], device=device, pack_cpu_linears=False)
    cond = pipe.encode("a photo of <i>", [image(5)], disk_cache=cache)
    uncond = pipe.encode_unconditional(disk_cache=cache)
    expected = pipe.encode("<i> in a text never encoded", [image(5)])
    parked = KosmosGPipeline.from_checkpoint(pack[0], device="cpu", pack_cpu_linears=False)
    parked.compute_device = torch.device(device)
    assert parked.model_key() == pipe.model_key()
    runs = []
    original = parked.model.forward
    parked.model.forward = lambda *args, **kwargs: (runs.append(1), original(*args, **kwargs))[1]
    read = parked.encode("a photo of <i>", [image(5)], disk_cache=cache, before_compute=lambda: runs.append("load"))
    assert runs == [] and torch.equal(read.cpu(), cond.cpu())
    assert torch.equal(parked.encode_unconditional(disk_cache=cache).cpu(), uncond.cpu()) and runs == []
    new = parked.encode("<i> in a text never encoded", [image(5)], disk_cache=cache,
                        before_compute=lambda: parked.model.to(device))  # what ComfyUI's load does
    assert new.device.type == torch.device(device).type and runs == [1]
    assert torch.allclose(new.float(), expected.float(), atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (4, 4, 64, 64)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_official_noise_on_the_device_is_the_official_demos_draw(device, dtype, shape):
    """Kosmos-G Official Noise's draw (`official_starting_noise`): the noise the official demo draws (torch.manual_seed,
    then torch.randn on the GPU in float16), also at the demo's own size (4 pictures, 512 px). No diffusers."""
    from test_official_sampling import assert_official_starting_noise

    assert_official_starting_noise(torch.device(device), dtype, shape)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_generate_draws_the_official_noise_on_the_device(device, dtype):
    """`generate --noise official --device cuda`: diffusers given its generator draws the demo's noise (needs
    diffusers, which scripts/device_checks.sh does not install: skipped there without it)."""
    pytest.importorskip("diffusers")
    from test_official_sampling import assert_generate_draws_the_official_noise

    assert_generate_draws_the_official_noise(torch.device(device), dtype)
