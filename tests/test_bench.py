"""`python -m kosmosg_core bench` on the tiny size: it runs, measures and reports every field."""

import json
import platform

import pytest
import torch

from kosmosg_core.cli import main


KERNELS = ["onednn", "default"] + (["few-row"] if platform.machine().lower() in ("x86_64", "amd64") else [])


@pytest.fixture
def tiny_bench(tmp_path):
    """One bench run timing every CPU kernel (the machine's yardsticks are measured once) -> (JSON, printed)."""
    import contextlib
    import io

    out = tmp_path / "results" / "bench.json"  # a folder that does not exist yet
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        # float32 named twice: timed once (a review found every case timed twice)
        main(["bench", "--size", "tiny", "--dtypes", "float32,float32", "--repeats", "1", "--threads", "1",
              "--cpu-linear", ",".join(KERNELS), "--json", str(out), "--workdir", str(tmp_path / "work")])
    return json.loads(out.read_text()), printed.getvalue()


@pytest.mark.slow
def test_bench_tiny_writes_measured_json_for_every_kernel(tiny_bench):
    results, printed = tiny_bench
    assert {c["linear_layers"] for c in results["cases"]} == set(KERNELS)  # few-row: x86-64 CPUs only
    for cpu_linear in KERNELS:
        _check_cases({**results, "cases": [c for c in results["cases"] if c["linear_layers"] == cpu_linear]},
                     printed, cpu_linear)


def _check_cases(results: dict, printed: str, cpu_linear: str) -> None:
    assert results["size"] == "tiny" and results["threads"] == 1
    assert [c["case"] for c in results["cases"]] == ["text-only", "1-image", "3-image"]
    for case in results["cases"]:
        assert case["seconds"] > 0 and case["flops"] > 0 and case["limit_seconds"] > 0
        assert case["ratio_to_limit"] == pytest.approx(case["seconds"] / case["limit_seconds"])
        assert 0 < case["best_seconds"] <= case["seconds"]
        assert case["best_ratio_to_limit"] == pytest.approx(case["best_seconds"] / case["limit_seconds"])
        assert case["linear_layers"] == cpu_linear
        assert (case["pack_seconds"] is not None) == (cpu_linear != "default")
        assert 0 < case["disk_cached_seconds"] < case["seconds"]  # read back, not encoded
        if case["case"] == "text-only":
            assert case["cached_image_seconds"] is None
        else:
            assert case["cache_speedup"] == pytest.approx(case["seconds"] / case["cached_image_seconds"])
        assert case["case"] in printed
        # per part: the parts that ran, their FLOPs and bytes adding up to the case's, each with its own limit
        assert set(case["parts"]) == ({"decoder", "aligner"} if case["case"] == "text-only" else
                                      {"vision", "connector", "decoder", "aligner"})
        parts = case["parts"].values()
        assert sum(p["flops"] for p in parts) == case["flops"]
        assert sum(p["weight_bytes_read"] for p in parts) == case["weight_bytes_read"]
        assert all(p["seconds"] > 0 and p["ratio_to_limit"] == pytest.approx(p["seconds"] / p["limit_seconds"]) for p in parts)
        assert sum(p["seconds"] for p in parts) <= case["seconds"]  # one timed run: parts inside the encode
        assert case["sum_of_part_limits_seconds"] == pytest.approx(sum(p["limit_seconds"] for p in parts))
        assert case["sum_of_part_limits_seconds"] >= case["limit_seconds"] * (1 - 1e-9)
    # one synthetic token per word (the official BPE keeps common words whole) after <s>
    from kosmosg_core.bench import PROMPTS

    tokens = {c["case"]: c["tokens"] for c in results["cases"]}
    assert tokens["text-only"] == 1 + len(PROMPTS["text-only"][0].split())
    assert tokens["text-only"] < tokens["1-image"] < tokens["3-image"]
    flops = {c["case"]: c["flops"] for c in results["cases"]}
    assert flops["1-image"] < flops["3-image"]  # two more images through the vision tower and the MLLM
    # weights read per case: counted from the parameters before packing (a packed weight is not one)
    from kosmosg_core.bench import SIZES
    from kosmosg_core.model import KosmosG

    model = KosmosG(SIZES["tiny"]())
    nbytes = {name: sum(p.numel() * p.element_size() for p in getattr(model, name).parameters())
              for name in ("vision", "connector", "decoder", "aligner")}
    # of the tables gathered by row (token embedding, aligner positions) only the T rows of the prompt count
    tables = [model.decoder.embed_tokens.weight, model.aligner.encoder_proj.embed_positions.weight]
    for case in results["cases"]:
        unread = sum((table.shape[0] - case["tokens"]) * table.shape[1] * table.element_size() for table in tables)
        images = nbytes["vision"] + nbytes["connector"] if case["case"] != "text-only" else 0
        assert case["weight_bytes_read"] == nbytes["decoder"] + nbytes["aligner"] - unread + images, case["case"]
    load = results["load"]
    assert load["pt"]["seconds"] > 0 and load["safetensors"]["seconds"] > 0 and load["page_cache"] == "warm"
    # the timed load ends with every weight in memory: the mapped .safetensors ones read too
    assert 0 < load["safetensors"]["lazy_seconds"] <= load["safetensors"]["seconds"]
    assert load["pt"]["runs"] == load["safetensors"]["runs"] == 3
    assert results["settings"]["repeats"] == 1 and results["settings"]["load_repeats"] == 3
    assert results["started_utc"].endswith("Z") and results["kosmosg_core"]
    assert load["pt"]["open_seconds"] > 0 and load["safetensors"]["open_seconds"] > 0
    assert load["safetensors_over_pt_time"] == pytest.approx(load["safetensors"]["seconds"] / load["pt"]["seconds"])
    assert results["yardsticks"]["matmul_TFLOPs_float32"] > 0 and results["yardsticks"]["memory_bandwidth_GBps"] > 0


@pytest.mark.slow
def test_bench_times_several_cpu_kernels_in_one_run(tmp_path, capsys):
    main(["bench", "--size", "tiny", "--dtypes", "float32,bfloat16", "--repeats", "1", "--threads", "1",
          "--cases", "text-only", "--cpu-linear", "auto,onednn,packed,default", "--json", str(tmp_path / "b.json"),
          "--workdir", str(tmp_path / "work")])
    results = json.loads((tmp_path / "b.json").read_text())
    # once per kernel and dtype, with the same yardsticks: auto = what the pipeline runs here (the
    # few-row kernel where it builds and runs the dtype, else oneDNN; bf16 only where the CPU has
    # native bf16); packed is oneDNN's old name: timed once
    from kosmosg_core.cpu_linear import kernel_runs_dtype, packs_dtype, resolve_cpu_kernel

    few_row = resolve_cpu_kernel("auto") == "few-row"
    fp32 = [("float32", "few-row")] if few_row else []
    fp32 += [("float32", "onednn"), ("float32", "default")]
    bf16 = [("bfloat16", "few-row")] if few_row and kernel_runs_dtype("few-row", torch.bfloat16) else []
    bf16 += [("bfloat16", "onednn"), ("bfloat16", "default")] if packs_dtype(torch.bfloat16) else [("bfloat16", "default")]
    assert [(c["dtype"], c["linear_layers"]) for c in results["cases"]] == fp32 + bf16
    assert "linear weights packed once after loading (all for oneDNN)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "--size", "tiny", "--cpu-linear", "onednn,fast"])
    assert "unknown --cpu-linear fast" in capsys.readouterr().err



def test_bench_refuses_a_size_this_machine_cannot_hold_before_building_it(tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    from kosmosg_core import bench

    built = []
    monkeypatch.setattr(bench, "write_checkpoints", lambda *args: built.append(args))
    monkeypatch.setattr(bench, "measure_memory_bandwidth", lambda device: 1e10)
    monkeypatch.setattr(bench, "_available_memory", lambda: 10**6)  # 1 MB free
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**14, 0, 10**14))  # whatever this disk has free
    args = ["bench", "--size", "official", "--repeats", "1", "--threads", "1", "--workdir", str(tmp_path)]
    assert main(args) == 2 and "is available. Use a smaller --size" in capsys.readouterr().err
    monkeypatch.setattr(bench, "_available_memory", lambda: 10**12)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    assert main(args) == 2 and "--workdir on a bigger disk" in capsys.readouterr().err
    assert built == []


def test_bench_without_transformers_and_a_ctrl_c_say_so_in_one_line(tmp_path, monkeypatch, capsys):
    """Found by a review: bench without transformers (not a requirement of the pack) ended in an ImportError
    traceback after its load measurements; Ctrl-C ended any sub-command in a KeyboardInterrupt traceback."""
    import sys

    from kosmosg_core import bench, cli

    built = []
    monkeypatch.setattr(bench, "write_checkpoints", lambda *args: built.append(args))
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails
    args = ["bench", "--size", "tiny", "--repeats", "1", "--threads", "1", "--workdir", str(tmp_path)]
    assert main(args) == 2 and "with transformers, which cannot be imported here" in capsys.readouterr().err
    assert built == []
    monkeypatch.delitem(sys.modules, "transformers")
    assert main([*args, "--dtypes", "float32,"]) == 2  # a trailing comma: named by its flag
    assert "--dtypes 'float32,': Unsupported dtype ''" in capsys.readouterr().err and built == []

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_info", interrupted)  # the parser is built by main: it takes this one
    assert main(["info", "--checkpoint", "x"]) == 130 and capsys.readouterr().err.strip() == "interrupted"


def test_the_readme_benchmark_table_is_the_committed_run():
    """README's official-size figures are docs/results/bench-official-cpu.json's, row by row (a review found
    paragraphs citing runs no committed file held): each case's encode time, ratios, cache speed-up and the loads."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    results = json.loads((repo / "docs" / "results" / "bench-official-cpu.json").read_text())
    readme = (repo / "README.md").read_text(encoding="utf-8")
    kernels = {"few-row": "few-row kernel (default)", "onednn": "oneDNN", "default": "torch default"}
    cases = {"text-only": "text-only", "1-image": "1 image", "3-image": "3 images"}
    dtypes = {"float32": "fp32", "bfloat16": "bf16"}
    seen = 0
    for case in results["cases"]:
        kernel = next(label for name, label in kernels.items() if case["linear_layers"].startswith(name))
        row = f"| {cases[case['case']]} | {dtypes[case['dtype']]}, {kernel} | {case['tokens']} |"
        line = next((line for line in readme.splitlines() if line.startswith(row)), None)
        assert line is not None, row
        cells = [cell.strip().strip("*") for cell in line.split("|")[1:-1]]
        assert cells[7] == f"{case['ratio_to_limit']:.2f}" and cells[8] == f"{case['best_ratio_to_limit']:.2f}", line
        assert float(cells[5].removesuffix(" s")) == pytest.approx(case["seconds"], rel=0.01), line
        if case["cache_speedup"]:
            assert cells[10] == f"{case['cache_speedup']:.1f}x", line
        seen += 1
    assert seen == 18
    load = results["load"]
    assert f"| official-format `.pt` (restricted unpickler) | {load['pt']['seconds']:.1f} s | " \
           f"{load['pt_peak_rss_over_weights']:.2f}x the weights |" in readme
    assert f"| ratio `.safetensors` / `.pt` (target <= 0.5) | **{load['safetensors_over_pt_time']:.2f}** |" in readme
    assert re.search(rf"\| pack `.safetensors` \(memory-mapped\) \| {load['safetensors']['seconds']:.2f} s ", readme)
