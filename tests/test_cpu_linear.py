"""The CPU fast paths: oneDNN-packed and few-row-kernel linear layers give the same outputs as nn.Linear."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from kosmosg_core import cpu_linear
from kosmosg_core.cpu_linear import (PackedLinear, cpu_packing_available, has_packed_linears, kernel_runs_dtype,
                                     multiplies_prompt_tokens, pack_linears, unpack_linears)
from kosmosg_core.errors import DeviceError
from kosmosg_core.pipeline import KosmosGPipeline

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not cpu_packing_available(), reason="this PyTorch build has no oneDNN packing")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 48), (2, 7, 48), (1, 1, 48)])
def test_packed_linear_matches_linear(shape, bias):
    torch.manual_seed(0)
    linear = nn.Linear(48, 80, bias=bias)
    x = torch.randn(shape)
    packed = PackedLinear(linear)
    with torch.inference_mode():
        expected, got = linear(x), packed(x)
    assert got.shape == expected.shape == (*shape[:-1], 80)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    restored = packed.to_linear()
    assert torch.equal(restored.weight, linear.weight)
    if bias:
        assert torch.equal(restored.bias, linear.bias)


def test_packed_linear_refuses_other_dtypes_with_a_fix():
    packed = PackedLinear(nn.Linear(8, 8))
    with pytest.raises(RuntimeError, match="unpack_linears"):
        packed(torch.randn(2, 8, dtype=torch.bfloat16))
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        with pytest.raises(RuntimeError, match="runs torch.bfloat16"):
            PackedLinear(nn.Linear(8, 8).to(torch.bfloat16))(torch.randn(2, 8))


def _image(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 30, 3), dtype=np.uint8))


def test_pipeline_packs_on_cpu_float32_and_matches_the_unpacked_model(pack):
    packed = KosmosGPipeline.from_checkpoint(pack[0], cpu_kernel="onednn")
    plain = KosmosGPipeline.from_checkpoint(pack[0], pack_cpu_linears=False)
    assert has_packed_linears(packed.model) and not has_packed_linears(plain.model)
    # every linear layer of all four parts packed, all for oneDNN
    for part in ("vision", "connector", "decoder", "aligner"):
        layers = list(getattr(packed.model, part).modules())
        assert not any(type(m) is nn.Linear for m in layers), part
        assert {m.kernel for m in layers if isinstance(m, PackedLinear)} == {"onednn"}, part
    prompts = ["a photo of <i> wearing <i> on the beach", "a dog"]
    images = [[_image(0), _image(1)], []]
    assert torch.allclose(packed.encode(prompts, images), plain.encode(prompts, images), atol=1e-5)
    assert torch.allclose(packed.encode_unconditional(), plain.encode_unconditional(), atol=1e-5)
    # unpacking gives back the exact weights
    count = unpack_linears(packed.model)
    assert count > 0 and not has_packed_linears(packed.model)
    for (name, a), (_, b) in zip(sorted(packed.model.state_dict().items()), sorted(plain.model.state_dict().items())):
        assert torch.equal(a, b), name


def _kernels_by_rows(model) -> dict[str, set]:
    """Kernels of the packed layers that multiply the prompt's tokens and of all the others."""
    kernels = {"prompt tokens": set(), "other": set()}
    for name, module in model.named_modules():
        if isinstance(module, PackedLinear):
            kernels["prompt tokens" if multiplies_prompt_tokens(name) else "other"].add((module.kernel, module.dtype))
    return kernels


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                    reason="needs a CPU with native bf16 (without it nothing is packed: the test below)")
def test_pipeline_packs_bfloat16_where_the_cpu_has_bf16(pack):
    bf16 = KosmosGPipeline.from_checkpoint(pack[0], dtype="bfloat16")
    plain = KosmosGPipeline.from_checkpoint(pack[0], dtype="bfloat16", pack_cpu_linears=False)
    # auto: the few-row kernel where its build runs bf16 (AVX512-BF16), else oneDNN
    few_row = cpu_linear.resolve_cpu_kernel("auto") == "few-row" and kernel_runs_dtype("few-row", torch.bfloat16)
    assert _kernels_by_rows(bf16.model) == {"prompt tokens": {("few-row" if few_row else "onednn", torch.bfloat16)},
                                            "other": {("onednn", torch.bfloat16)}}
    assert not any(type(m) is nn.Linear for m in bf16.model.modules())
    prompts = ["a photo of <i> wearing <i> on the beach", "a dog"]
    images = [[_image(0), _image(1)], []]
    got, expected = bf16.encode(prompts, images), plain.encode(prompts, images)
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), expected.float(), atol=0.05, rtol=0.02)
    assert unpack_linears(bf16.model) > 0
    for (name, a), (_, b) in zip(sorted(bf16.model.state_dict().items()), sorted(plain.model.state_dict().items())):
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b), name


def test_without_native_bf16_bfloat16_stays_plain(monkeypatch):
    # emulated bf16 matmuls would be slower than plain ones: packs_dtype says no, nothing is packed
    monkeypatch.setattr(cpu_linear, "_onednn_has_native_bf16", lambda: False)
    assert cpu_linear.packs_dtype(torch.float32) and not cpu_linear.packs_dtype(torch.bfloat16)
    model = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16)
    assert pack_linears(model, "onednn") == 0 and type(model[0]) is nn.Linear
    assert not cpu_linear.packs_by_default(torch.device("cpu"), torch.bfloat16)
    assert cpu_linear.packs_by_default(torch.device("cpu"), torch.float32)
    assert not cpu_linear.packs_by_default(torch.device("meta"), torch.float32)  # another device: never


def test_float16_weights_are_not_packed():
    model = nn.Sequential(nn.Linear(8, 8)).half()
    assert pack_linears(model) == 0 and type(model[0]) is nn.Linear
    with pytest.raises(DeviceError, match="does not run torch.float16"):
        PackedLinear(model[0])


# --- the few-row kernel (csrc/few_row_linear.cpp), built by torch.utils.cpp_extension ---
x86_only = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                              reason="the few-row kernel exists for x86-64 CPUs only")


@x86_only
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 13, 40])
@pytest.mark.parametrize("in_features,out_features", [(3, 16), (600, 40), (2100, 17)])
def test_few_row_linear_matches_linear(rows, in_features, out_features, bias):
    # 2-80 rows across the 6- and 12-row register tiles, depths across the 128 KiB chunks, widths
    # not multiples of 16
    torch.manual_seed(rows)
    linear = nn.Linear(in_features, out_features, bias=bias)
    x = torch.randn(2, rows, in_features)
    packed = PackedLinear(linear, kernel="few-row")
    with torch.inference_mode():
        expected, got = linear(x), packed(x)
    assert got.shape == expected.shape == (2, rows, out_features)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(packed.to_linear().weight, linear.weight)
    with pytest.raises(RuntimeError, match="unpack_linears"):
        packed(x.double())


def _assert_bf16_products_match(got: torch.Tensor, x: torch.Tensor, linear: nn.Linear):
    """bf16 products: float32 accumulation rounded once, so within one bf16 rounding step (2^-8
    relative) of the float32 product of the same bf16 values."""
    exact = torch.nn.functional.linear(x.float(), linear.weight.float(),
                                       None if linear.bias is None else linear.bias.float())
    assert got.dtype == torch.bfloat16 and got.shape == exact.shape
    assert torch.all((got.float() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-5)


def _few_row_runs_bf16() -> bool:
    return (cpu_linear.few_row_kernel_unavailable_reason() is None
            and cpu_linear.few_row_build_for_this_cpu() == "avx512bf16" and kernel_runs_dtype("few-row", torch.bfloat16))


@pytest.mark.skipif(not _few_row_runs_bf16(), reason="the bf16 few-row kernel needs a CPU with AVX512-BF16")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 11, 12, 13, 77])
@pytest.mark.parametrize("in_features,out_features", [(3, 16), (601, 40), (4099, 33)])
def test_few_row_bfloat16_linear_matches_float32_products(rows, in_features, out_features, bias):
    # odd depths (k pairs zero-padded), depths across the 128 KiB chunks (1024 pairs), widths not
    # multiples of the 32-column panels
    torch.manual_seed(rows)
    linear = nn.Linear(in_features, out_features, bias=bias).to(torch.bfloat16)
    x = torch.randn(2, rows, in_features, dtype=torch.bfloat16)
    packed = PackedLinear(linear, kernel="few-row")
    assert packed.packed_weight.shape == (-(-out_features // 32), -(-in_features // 2), 32, 2)
    with torch.inference_mode():
        _assert_bf16_products_match(packed(x), x, linear)
    assert torch.equal(packed.to_linear().weight, linear.weight)
    with pytest.raises(RuntimeError, match="unpack_linears"):
        packed(x.float())


@x86_only
@pytest.mark.parametrize("build", list(cpu_linear.FEW_ROW_BUILDS))
def test_each_instruction_set_build_matches_linear(build):
    runs_here = {"avx2": ["avx2"], "avx512vl": ["avx2", "avx512vl"], "avx512bf16": list(cpu_linear.FEW_ROW_BUILDS)}
    if build not in runs_here[cpu_linear.few_row_build_for_this_cpu()]:
        pytest.skip(f"this CPU cannot run the {build} build")
    kernel = cpu_linear._build_few_row_kernel(build)
    assert kernel.tile_rows() == (6 if build == "avx2" else 12)
    assert kernel.has_bfloat16() == (build == "avx512bf16")
    if build == cpu_linear.few_row_build_for_this_cpu():  # the CPU's own build is the best one
        assert cpu_linear.load_few_row_kernel().has_bfloat16() == kernel.has_bfloat16()
    torch.manual_seed(0)
    linear = nn.Linear(2100, 40)
    panels = kernel.pack_weight(linear.weight.detach())
    for rows in (1, 5, 6, 7, 11, 12, 13, 25, 77):
        x = torch.randn(rows, 2100)
        with torch.inference_mode():
            got = kernel.linear(x, panels, 40, linear.bias.detach())
            assert torch.allclose(got, linear(x), atol=1e-5, rtol=1e-5), rows
    linear_bf16, x_bf16 = linear.to(torch.bfloat16), torch.randn(11, 2100, dtype=torch.bfloat16)
    if build == "avx512bf16":
        with torch.inference_mode():
            got = kernel.linear(x_bf16, kernel.pack_weight(linear_bf16.weight.detach()), 40, linear_bf16.bias.detach())
        _assert_bf16_products_match(got, x_bf16, linear_bf16)
    else:  # a build without bf16 refuses it by name
        with pytest.raises(RuntimeError, match="expected a float32 CPU tensor, got BFloat16"):
            kernel.pack_weight(linear_bf16.weight.detach())


@x86_only
@pytest.mark.skipif(not cpu_linear.packs_dtype(torch.bfloat16), reason="bfloat16 is packed only with native bf16")
def test_a_few_row_build_without_bf16_leaves_bfloat16_layers_to_onednn(monkeypatch):
    # where oneDNN runs bf16 but the few-row build has no AVX512-BF16 instructions
    real = cpu_linear.load_few_row_kernel()

    class WithoutBf16:
        def __getattr__(self, name):
            return getattr(real, name)

        def has_bfloat16(self):
            return False

    monkeypatch.setattr(cpu_linear, "load_few_row_kernel", lambda: WithoutBf16())
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4)).to(torch.bfloat16)
    fp32 = nn.Sequential(nn.Linear(16, 8))
    assert pack_linears(model, "few-row") == 2 and pack_linears(fp32, "few-row") == 1
    assert {m.kernel for m in model} == {"onednn"} and fp32[0].kernel == "few-row"


@x86_only
def test_few_row_kernel_runs_on_torch_threads():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cpu_linear.load_few_row_kernel().parallel_for_threads(64) == 2  # 1 = built without OpenMP
    finally:
        torch.set_num_threads(threads)


@x86_only
def test_pipeline_with_few_row_kernel_matches_the_unpacked_model(pack, tmp_path):
    fast = KosmosGPipeline.from_checkpoint(pack[0], cpu_kernel="few-row")
    plain = KosmosGPipeline.from_checkpoint(pack[0], pack_cpu_linears=False)
    # the layers that multiply the prompt's tokens get the kernel, the image and 77-query layers oneDNN
    assert _kernels_by_rows(fast.model) == {"prompt tokens": {("few-row", torch.float32)},
                                            "other": {("onednn", torch.float32)}}
    packed = {name for name, m in fast.model.named_modules() if isinstance(m, PackedLinear) and m.kernel == "few-row"}
    assert "decoder.layers.0.ffn.fc1" in packed and "aligner.encoder_proj.layers.0.self_attn.q_proj" in packed
    assert "aligner.encoder.layers.0.encoder_attn.k_proj" in packed
    assert not packed & {"aligner.encoder.layers.0.encoder_attn.q_proj", "aligner.encoder.layers.0.self_attn.v_proj",
                         "aligner.encoder.layers.0.ffn.fc2", "connector.dense"}
    prompts = ["a photo of <i> wearing <i> on the beach", "a dog"]
    images = [[_image(0), _image(1)], []]
    assert torch.allclose(fast.encode(prompts, images), plain.encode(prompts, images), atol=1e-5)
    assert torch.allclose(fast.encode_unconditional(), plain.encode_unconditional(), atol=1e-5)
    # the CLI's --cpu-kernel few-row writes the same conditioning
    from safetensors.torch import load_file

    from kosmosg_core.cli import main

    main(["encode", "--checkpoint", str(pack[0]), "--prompt", "a dog", "--cpu-kernel", "few-row", "--out", str(tmp_path / "c.safetensors")])
    assert torch.allclose(load_file(tmp_path / "c.safetensors")["cond"], plain.encode("a dog"), atol=1e-5)


def test_few_row_kernel_unavailable_is_a_clear_error(monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpu_linear, "_few_row_module", None)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    monkeypatch.setattr(cpu_linear.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(DeviceError, match=r"ninja.*cpu_kernel='onednn'"):
        pack_linears(model, kernel="few-row")
    assert type(model[0]) is nn.Linear  # nothing was replaced
    assert cpu_linear.few_row_build_for_this_cpu() == "avx2"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert "no AVX2" in cpu_linear.few_row_kernel_unavailable_reason()
    with pytest.raises(DeviceError, match="Unknown cpu_kernel 'fast'"):
        PackedLinear(nn.Linear(8, 8), kernel="fast")


def test_auto_kernel_is_few_row_where_it_builds_else_onednn(monkeypatch, caplog):
    expected = "few-row" if cpu_linear.few_row_kernel_unavailable_reason() is None else "onednn"
    assert cpu_linear.resolve_cpu_kernel("auto") == expected
    assert cpu_linear.resolve_cpu_kernel("onednn") == "onednn"
    with pytest.raises(DeviceError, match="Unknown cpu_kernel 'fast'"):
        cpu_linear.resolve_cpu_kernel("fast")
    # unavailable: oneDNN, said in the log, no error
    monkeypatch.setattr(cpu_linear, "few_row_kernel_unavailable_reason", lambda: "ninja is not installed (pip install ninja)")
    with caplog.at_level("INFO", logger="kosmosg_core.cpu_linear"):
        assert cpu_linear.resolve_cpu_kernel("auto") == "onednn"
    assert "ninja is not installed" in caplog.text
    # a failed build: oneDNN with a warning, and the build is not retried
    calls = []

    def failing_build(build):
        calls.append(build)
        raise DeviceError("cpu_kernel='few-row': building few_row_linear.cpp failed (no Python.h). Use cpu_kernel='onednn'.")

    monkeypatch.setattr(cpu_linear, "few_row_kernel_unavailable_reason", lambda: None)
    monkeypatch.setattr(cpu_linear, "_few_row_module", None)
    monkeypatch.setattr(cpu_linear, "_few_row_build_error", None)
    monkeypatch.setattr(cpu_linear, "_build_few_row_kernel", failing_build)
    caplog.clear()
    with caplog.at_level("WARNING", logger="kosmosg_core.cpu_linear"):
        model = nn.Sequential(nn.Linear(8, 8))
        assert pack_linears(model) == 1 and model[0].kernel == "onednn"
        assert cpu_linear.resolve_cpu_kernel("auto") == "onednn"
    assert "no Python.h" in caplog.text and len(calls) == 1
    with pytest.raises(DeviceError, match="no Python.h"):  # asked for explicitly: the clear error
        pack_linears(nn.Sequential(nn.Linear(8, 8)), kernel="few-row")


@x86_only
def test_pipeline_defaults_to_the_few_row_kernel_where_it_builds(pack):
    assert cpu_linear.few_row_kernel_unavailable_reason() is None  # the test machines can build it
    pipe = KosmosGPipeline.from_checkpoint(pack[0])
    assert _kernels_by_rows(pipe.model)["prompt tokens"] == {("few-row", torch.float32)}


def test_checking_for_the_few_row_kernel_does_not_warn_about_cuda(tmp_path):
    # torch.utils.cpp_extension warns "No CUDA runtime is found" on import where a CUDA toolkit is found but no
    # GPU; the few-row kernel is a CPU build, so the pack imports it with that warning silenced
    env = dict(os.environ, CUDA_HOME=str(tmp_path), CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    warning = "No CUDA runtime is found"

    def stderr_of(code):
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                              timeout=120).stderr

    assert warning in stderr_of("import torch.utils.cpp_extension")  # the setting does provoke it
    assert warning not in stderr_of("from kosmosg_core import cpu_linear\n"
                                    "cpu_linear.few_row_kernel_unavailable_reason()\n"
                                    "import torch.utils.cpp_extension")


def test_kernel_source_is_built_from_a_content_addressed_copy(tmp_path, monkeypatch):
    """torch's build cache keys on the source's path: the kernel is compiled from a copy whose path depends on
    its content only, so another checkout of the pack reuses the build; where no copy can be made, the pack's file."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = cpu_linear._content_addressed_source()
    assert path.is_relative_to(tmp_path / "cache" / "kosmosg" / "csrc")
    assert path.read_bytes() == cpu_linear._FEW_ROW_SOURCE.read_bytes()
    written = path.stat().st_mtime_ns
    assert cpu_linear._content_addressed_source() == path and path.stat().st_mtime_ns == written  # not rewritten
    (tmp_path / "blocked").write_text("a file where the cache folder should be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "blocked"))
    assert cpu_linear._content_addressed_source() == cpu_linear._FEW_ROW_SOURCE


def test_the_kernel_build_is_given_the_content_addressed_source(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    loads = []
    fake_cpp_extension = type("CppExtension", (), {"load": staticmethod(lambda **kwargs: loads.append(kwargs))})
    monkeypatch.setattr(cpu_linear, "_cpp_extension", lambda: fake_cpp_extension)
    cpu_linear._build_few_row_kernel("avx2")
    assert loads[0]["name"] == "kosmosg_few_row_linear_avx2"
    assert loads[0]["sources"] == [str(cpu_linear._content_addressed_source())]
    assert loads[0]["sources"][0].startswith(str(tmp_path / "cache"))
