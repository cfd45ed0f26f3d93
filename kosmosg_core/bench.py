"""`python -m kosmosg_core bench`: measured load time, peak RSS and encode latency, with yardsticks.

Everything printed is measured in this run on this machine:
- yardstick (a): the machine's practical limit for each case, max(FLOPs / measured matmul rate,
  weight bytes read / measured memory bandwidth) (decisions.md "Benchmark limit");
- yardstick (b): the SD1.5 CLIP text encoder's forward (transformers `CLIPTextModel`, random weights);
- encode: the median of `--repeats` fresh encodes ("ratio": against the limit, which is built
  from the yardsticks' best runs, so the strict comparison) and their best ("best": like for like);
- `--cpu-linear` picks the CPU linear layers, several in one run: auto (the default: what the
  pipeline runs here), onednn (oneDNN-packed weights; float32, and bfloat16 where the CPU has
  native bf16), few-row (the few-row kernel in the layers that multiply the prompt's tokens,
  oneDNN in the others; bfloat16 where the CPU has AVX512-BF16), default (torch's own matmul);
- disk: an encode after a restart with a `DiskCache` holding it (nothing in memory; no model load counted);
- load: official-format `.pt` (restricted unpickler) vs the pack's `.safetensors`, each in a fresh
  subprocess, with peak RSS above the process's post-import baseline; and the time to open each (config,
  tensor names and shapes checked, no weight read: what a lazy pipeline costs when its caches hold it all).
Weights are random (no download); speed does not depend on their values.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .config import KosmosGConfig
from .disk_cache import DiskCache
from .cpu_linear import cpu_packing_available, kernel_runs_dtype, packs_by_default, resolve_cpu_kernel

SIZES = {
    "official": KosmosGConfig.official,
    "small": lambda: KosmosGConfig.from_dict({
        "vision": {"image_size": 224, "patch_size": 14, "width": 256, "layers": 4, "heads": 4},
        "connector": {"num_queries": 64, "heads": 8},
        "decoder": {"vocab_size": 64007, "width": 512, "layers": 4, "heads": 8, "ffn_width": 2048},
        "aligner": {"width": 768, "heads": 12, "ffn_width": 3072, "encoder_layers": 2, "decoder_layers": 2},
        "image_token_slots": 64}),
    "tiny": lambda: KosmosGConfig.tiny(vocab_size=107, context_dim=768),
}
PROMPTS = {  # case name -> (prompt, number of images)
    "text-only": ("a photo of a dog wearing sunglasses on the beach", 0),
    "1-image": ("a photo of <i> on the beach at sunset", 1),
    "3-image": ("<i> and <i> sitting on <i> in a garden", 3),
}


def _run_times(fn, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of `fn` (which synchronises the device itself)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _median_time(fn, repeats: int) -> float:
    return statistics.median(_run_times(fn, repeats))


def measure_matmul_rate(dtype: torch.dtype, device: torch.device, max_n: int = 2048, repeats: int = 10) -> float:
    """Peak FLOP/s of plain n x n matmuls (the machine's practical compute limit): the best single
    product over n = 256, 512, ... (doubling while one product takes under 0.1 s, so dtypes without
    native support stay quick) and over the plain forms: `a @ b`, `a @ b.T` (`F.linear`, what a
    model's layers call) and, on the CPU, oneDNN's linear with `b` packed once (what the pipeline
    runs there; on this project's CPU it reaches ~10 % more than the best other form, so leaving it
    out would give a limit below what an encode achieves). Without native bf16 a CPU's `a @ b` falls
    back to a kernel ~15x slower than `F.linear`'s, which alone would make a meaningless limit. The
    best, not the median: the limit must not drop because a neighbour process or clock change
    slowed one measurement."""
    use_onednn = cpu_packing_available() and packs_by_default(device, dtype)
    best, n = 0.0, 256
    while True:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        forms = [lambda: a @ b, lambda: torch.nn.functional.linear(a, b)]
        if use_onednn:
            packed_b = torch.ops.mkldnn._reorder_linear_weight(b, None)
            forms.append(lambda: torch.ops.mkldnn._linear_pointwise(a, packed_b, None, "none", [], ""))
        slowest_median = 0.0
        for form in forms:
            with torch.inference_mode():
                form()  # warm-up
                seconds = _run_times(lambda: (form(), _sync(device)), repeats)
            best = max(best, 2 * n ** 3 / min(seconds))
            slowest_median = max(slowest_median, statistics.median(seconds))
        if n >= max_n or slowest_median > 0.1:
            return best
        n *= 2


def measure_memory_bandwidth(device: torch.device, megabytes: int = 1024, repeats: int = 10) -> float:
    """Bytes/s of reading a large buffer once (what reading weights costs): the best of `repeats`
    reads, like the matmul rate (on this VM single reads vary by 2x with the neighbours' load)."""
    x = torch.ones(megabytes * 2 ** 20 // 4, dtype=torch.float32, device=device)
    x.sum()
    return x.numel() * 4 / min(_run_times(lambda: (x.sum(), _sync(device)), repeats))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


PARTS = ("vision", "connector", "decoder", "aligner")  # the KosmosG parts an encode runs, in order


def count_flops(model: torch.nn.Module, fn) -> dict[str, int]:
    """Multiply-add FLOPs of one call of `fn` per part of `model` (`PARTS`), counted from the shapes
    each layer actually sees: 2*in*out per row for Linear, 2*k*k*c_in*c_out per output pixel for
    Conv2d, and the two attention products (2*T*S*K each per head) for every MultiheadAttention."""
    from .cpu_linear import PackedLinear
    from .layers import MultiheadAttention

    totals = dict.fromkeys(PARTS, 0)

    def linear_hook(part):
        def hook(module, inputs, output):
            totals[part] += 2 * module.in_features * module.out_features * (output.numel() // module.out_features)
        return hook

    def conv_hook(part):
        def hook(module, inputs, output):
            kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            totals[part] += 2 * kernel * output.numel()
        return hook

    def attention_hook(part):
        def hook(module, args, kwargs, output):
            query = args[0] if args else kwargs["query"]
            key_value = args[1] if len(args) > 1 else kwargs["key_value"]
            B, T, D = query.shape
            totals[part] += 2 * 2 * B * T * key_value.shape[1] * D  # scores + weighted sum, all heads
        return hook

    handles = []
    for part in PARTS:
        for module in getattr(model, part).modules():
            if isinstance(module, (torch.nn.Linear, PackedLinear)):
                handles.append(module.register_forward_hook(linear_hook(part)))
            elif isinstance(module, torch.nn.Conv2d):
                handles.append(module.register_forward_hook(conv_hook(part)))
            elif isinstance(module, MultiheadAttention):
                handles.append(module.register_forward_hook(attention_hook(part), with_kwargs=True))
    try:
        fn()
    finally:
        for handle in handles:
            handle.remove()
    return totals


def time_with_parts(model: torch.nn.Module, fn, repeats: int,
                    device: torch.device) -> tuple[float, float, dict[str, float]]:
    """Median and best seconds of `fn()` and, from the same runs, each part's median seconds (forward
    hooks: where the time of an encode goes, for the per-part limits)."""
    runs: list[dict[str, float]] = []  # per timed run: part -> seconds

    def pre_hook(part):
        def hook(module, args):
            _sync(device)
            runs[-1][part] = runs[-1].get(part, 0.0) - time.perf_counter()
        return hook

    def post_hook(part):
        def hook(module, args, output):
            _sync(device)
            runs[-1][part] += time.perf_counter()
        return hook

    def one_run():
        runs.append({})
        fn()

    handles = [h for part in PARTS for h in (getattr(model, part).register_forward_pre_hook(pre_hook(part)),
                                               getattr(model, part).register_forward_hook(post_hook(part)))]
    try:
        totals = _run_times(one_run, repeats)
    finally:
        for handle in handles:
            handle.remove()
    parts = {part: statistics.median(run.get(part, 0.0) for run in runs) for part in PARTS}
    return statistics.median(totals), min(totals), parts


def clip_text_yardstick(device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    """Seconds per forward of the SD1.5 CLIP text encoder (ViT-L/14 text tower) on 77 tokens."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
    model = CLIPTextModel(config).to(device=device, dtype=dtype).eval()
    ids = torch.randint(0, 49408, (1, 77), device=device)
    with torch.inference_mode():
        model(ids)
        return _median_time(lambda: (model(ids), _sync(device)), repeats)


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), in bytes; None where it cannot be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_resources(cfg: KosmosGConfig, workdir: Path) -> None:
    """Refuse, before minutes of building, a run this machine cannot hold: the fp32 model is built in memory
    (about twice its weights at the peak) and written twice (.pt and .safetensors) into `workdir`."""
    from .errors import KosmosGError
    from .model import KosmosG

    with torch.device("meta"):
        weight_bytes = sum(p.numel() * 4 for p in KosmosG(cfg).parameters())
    disk_free = shutil.disk_usage(workdir).free
    memory = _available_memory()
    gb = lambda n: f"{n / 1e9:.1f} GB"  # noqa: E731
    if disk_free < 2.1 * weight_bytes:
        raise KosmosGError(f"The benchmark writes two {gb(weight_bytes)} checkpoints into {workdir}, which has "
                           f"{gb(disk_free)} free; pass --workdir on a bigger disk or use a smaller --size.")
    if memory is not None and memory < 2 * weight_bytes:
        raise KosmosGError(f"The benchmark's model takes about {gb(2 * weight_bytes)} of memory while it is built; "
                           f"{gb(memory)} is available. Use a smaller --size (small, tiny) or free memory.")


def write_checkpoints(cfg: KosmosGConfig, workdir: Path, dtype: torch.dtype) -> tuple[Path, Path, int]:
    """Random model -> official-format .pt + pack .safetensors. Returns (pt, safetensors, weight bytes)."""
    from .checkpoint import save_pack_checkpoint, to_official_state_dict
    from .model import KosmosG

    torch.manual_seed(0)
    model = KosmosG(cfg).to(dtype)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    pt_path, st_path = workdir / "checkpoint_bench.pt", workdir / "checkpoint_bench.safetensors"
    # the fairseq layout: weights under "model", plus training state the loader must skip
    torch.save({"model": to_official_state_dict(model.state_dict()), "args": None,
                "optimizer_history": [{"num_updates": 0}], "extra_state": {"epoch": 1}}, pt_path)
    (workdir / "checkpoint_bench.json").write_text(cfg.to_json())  # sidecar config (heads not inferable for tiny)
    save_pack_checkpoint(model, None, st_path)
    del model
    return pt_path, st_path, weight_bytes


_LOAD_SNIPPET = r"""
import json, os, sys, time, torch
torch.set_num_threads({threads})
from kosmosg_core.checkpoint import check_checkpoint_tensors, read_checkpoint, build_model
def rss_kb(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1])
base = rss_kb('VmRSS:')
start = time.perf_counter()  # opening (inspect_checkpoint but its tokenizer: the bench files hold none)
check_checkpoint_tensors({path!r})
open_seconds = time.perf_counter() - start
start = time.perf_counter()
cfg, sd, _ = read_checkpoint({path!r})
model = build_model(cfg, sd, {path!r}, {dtype}, 'cpu')
lazy_seconds = time.perf_counter() - start
# a .safetensors file's tensors are mapped, read when first used: one value per page touched, so both files' times
# and peaks include having every weight in memory (the .pt load has read them all already)
for tensor in model.state_dict().values():
    tensor.reshape(-1)[::max(1, 4096 // tensor.element_size())].sum()
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "lazy_seconds": lazy_seconds,
                  "peak_rss_bytes": (rss_kb('VmHWM:') - base) * 1024, "open_seconds": open_seconds}}))
"""


LOAD_REPEATS = 3  # loads of each file, alternating (.pt, .safetensors, .pt, ...): the median of each is reported


def _read_through(path: Path) -> None:
    """Read the file once (into the page cache): every load starts with its file cached, whichever ran before."""
    with open(path, "rb") as handle:
        while handle.read(2**24):
            pass


def measure_load(path: Path, dtype: torch.dtype, threads: int) -> dict:
    """One load of `path` in a fresh process, its file in the page cache: seconds (opened, built and every weight
    in memory), lazy_seconds (before the weights were touched), open_seconds, peak RSS over the process's own."""
    code = _LOAD_SNIPPET.format(path=str(path), dtype=f"torch.{str(dtype).split('.')[-1]}", threads=threads)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    _read_through(path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_loads(paths: dict[str, Path], dtype: torch.dtype, threads: int, repeats: int = LOAD_REPEATS) -> dict:
    """name -> the median of `repeats` loads of each file (taken in turns) of each measured figure."""
    runs: dict[str, list[dict]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, path in paths.items():
            runs[name].append(measure_load(path, dtype, threads))
    return {name: {key: statistics.median(run[key] for run in loads) for key in loads[0]} | {"runs": len(loads)}
            for name, loads in runs.items()}


def _synthetic_tokenizer_pipeline(model, cfg):
    """A pipeline with a synthetic tokenizer: the benchmark needs ids, not real words."""
    from .pipeline import KosmosGPipeline

    class SyntheticTokenizer:
        """One id per word: the official sentencepiece BPE (64k pieces) keeps common English words
        whole, so a prompt's token count is about its word count (decisions.md: a short text-only
        encode is bound by reading the weights). Deterministic, vocabulary-independent lengths."""

        vocab_size = cfg.decoder.vocab_size
        image_id, image_end_id = vocab_size - 4, vocab_size - 3

        def encode(self, text):
            return [4 + sum(map(ord, word)) % min(1000, self.vocab_size - 11) for word in text.split()]

    return KosmosGPipeline(model, SyntheticTokenizer())


def time_encode_cases(cfg: KosmosGConfig, dtype: torch.dtype, device: torch.device, images: list, rate: float,
                      bandwidth: float, cpu_linear: str, args) -> list[dict]:
    """Encode latency per prompt case for one dtype, with its limit and the CLIP-text yardstick."""
    from .model import KosmosG

    clip_seconds = clip_text_yardstick(device, dtype, args.repeats)
    model = KosmosG(cfg).to(device=device, dtype=dtype).eval().requires_grad_(False)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    # Counted before packing: a packed weight is no longer a parameter of its layer.
    param_bytes = {name: sum(p.numel() * p.element_size() for p in getattr(model, name).parameters()) for name in PARTS}
    # tables an encode gathers rows of (T of them): the token embedding, the aligner's learned positions
    row_tables = {"decoder": model.decoder.embed_tokens.weight, "aligner": model.aligner.encoder_proj.embed_positions.weight}
    pack_seconds = None
    if cpu_linear != "default" and packs_by_default(device, dtype):
        from .cpu_linear import pack_for_cpu_encode

        start = time.perf_counter()
        pack_for_cpu_encode(model, kernel=cpu_linear)
        pack_seconds = time.perf_counter() - start
    pipe = _synthetic_tokenizer_pipeline(model, cfg)
    pipe.model_identity = f"bench|{dtype}|{device}"  # for the disk cache: random weights, one per dtype and device
    # removed at the end, or when the object is collected (an error in a case)
    cache_folder = tempfile.TemporaryDirectory(prefix="kosmosg-bench-cache-")
    disk_cache = DiskCache(cache_folder.name)
    cases = []
    for case, (prompt, n_images) in PROMPTS.items():
        if case not in args.cases.split(","):
            continue
        case_images = images[:n_images]

        def encode_fresh():
            pipe.clear_cache()
            pipe.encode(prompt, case_images)
            _sync(device)

        encode_fresh()  # warm-up
        part_flops = count_flops(model, encode_fresh)
        seconds, best_seconds, part_seconds = time_with_parts(model, encode_fresh, args.repeats, device)
        cached = None
        if n_images:
            pipe.encode(prompt, case_images)
            cached = _median_time(lambda: (pipe.encode(prompt, case_images), _sync(device)), args.repeats)

        def encode_after_restart():  # nothing in memory, the encoding on disk (written by the first call)
            pipe.clear_cache()
            pipe.encode(prompt, case_images, disk_cache=disk_cache)
            _sync(device)

        encode_after_restart()
        disk_cached = _median_time(encode_after_restart, args.repeats)
        # per part: its own limit, from the FLOPs it ran and the weights it read (row tables: the T rows gathered)
        tokens = len(pipe.check_inputs(prompt, case_images))
        part_read = dict(param_bytes)
        for part, table in row_tables.items():
            part_read[part] -= (table.shape[0] - tokens) * table.shape[1] * table.element_size()
        parts = {}
        for part in PARTS:
            if part_flops[part]:
                part_limit = max(part_flops[part] / rate, part_read[part] / bandwidth)
                parts[part] = {"seconds": part_seconds[part], "flops": part_flops[part],
                               "weight_bytes_read": part_read[part], "limit_seconds": part_limit,
                               "ratio_to_limit": part_seconds[part] / part_limit}
        flops = sum(part_flops.values())
        read = sum(parts[part]["weight_bytes_read"] for part in parts)
        limit = max(flops / rate, read / bandwidth)
        cases.append({
            "case": case, "dtype": str(dtype).split(".")[-1], "tokens": tokens,
            "seconds": seconds, "flops": flops,
            "weight_bytes_read": read, "limit_seconds": limit, "ratio_to_limit": seconds / limit,
            # the yardsticks are the best of their runs; the best encode is the like-for-like comparison
            "best_seconds": best_seconds, "best_ratio_to_limit": best_seconds / limit,
            "sum_of_part_limits_seconds": sum(parts[part]["limit_seconds"] for part in parts), "parts": parts,
            "cached_image_seconds": cached, "cache_speedup": (seconds / cached) if cached else None,
            "disk_cached_seconds": disk_cached,
            "clip_text_encoder_seconds": clip_seconds, "linear_layers": cpu_linear if pack_seconds is not None else "default",
            "pack_seconds": pack_seconds})
    cache_folder.cleanup()
    return cases


def _resolve_cpu_linear(name: str, dtype: torch.dtype) -> str:
    """--cpu-linear entry -> what runs: "auto" is what the pipeline picks here; where the few-row
    kernel does not run this dtype, oneDNN runs for it, as in the pipeline. "packed" is oneDNN's old name
    here (earlier results files say "packed")."""
    if name == "packed":
        name = "onednn"
    elif name == "auto":
        name = resolve_cpu_kernel("auto")
    return "onednn" if name == "few-row" and not kernel_runs_dtype("few-row", dtype) else name


def run_benchmark(args) -> dict:
    from .errors import KosmosGError
    from .files import check_output_file, check_output_folder, write_text_atomic
    from .devices import resolve_device, resolve_dtype

    # every argument checked before minutes of measuring
    try:  # the CLIP text yardstick's model (not a requirement of the pack: ComfyUI brings it, as do the tests)
        import transformers  # noqa: F401
    except ImportError as e:
        raise KosmosGError(f"bench measures the SD1.5 CLIP text encoder as a yardstick, with transformers, which "
                           f"cannot be imported here ({e}); pip install transformers.") from e
    unknown = [case for case in args.cases.split(",") if case not in PROMPTS]
    if unknown:
        raise KosmosGError(f"--cases: unknown case(s) {', '.join(unknown)}; use a comma list of {', '.join(PROMPTS)}.")
    for name, value in (("--repeats", args.repeats), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise KosmosGError(f"{name} must be at least 1, got {value}.")
    if args.json:
        check_output_file(args.json, "--json")
    if args.workdir:
        check_output_folder(args.workdir, "--workdir")
    threads = args.threads or min(os.cpu_count() or 1, 2 if os.environ.get("CI") else os.cpu_count() or 1)
    torch.set_num_threads(threads)
    device = resolve_device(args.device)
    cfg = SIZES[args.size]()
    try:  # each once, in the order given (a dtype named twice was timed twice)
        dtypes = list(dict.fromkeys(resolve_dtype(d) for d in args.dtypes.split(",")))
    except KosmosGError as e:
        raise KosmosGError(f"--dtypes {args.dtypes!r}: {e}") from e
    from . import __version__

    # what the run was: a results file names its own settings and time (the README cites the file)
    results = {"size": args.size, "device": str(device), "threads": threads, "torch": torch.__version__,
               "kosmosg_core": __version__, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "settings": {"dtypes": args.dtypes, "cpu_linear": args.cpu_linear, "cases": args.cases,
                            "repeats": args.repeats, "load_repeats": LOAD_REPEATS},
               "cases": [], "load": {}, "yardsticks": {}}
    bandwidth = measure_memory_bandwidth(device)
    results["yardsticks"]["memory_bandwidth_GBps"] = bandwidth / 1e9

    workdir_ctx = tempfile.TemporaryDirectory() if args.workdir is None else None
    workdir = Path(args.workdir or workdir_ctx.name)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        check_resources(cfg, workdir)
        file_dtype = torch.float32
        pt_path, st_path, weight_bytes = write_checkpoints(cfg, workdir, file_dtype)
        loads = measure_loads({"pt": pt_path, "safetensors": st_path}, file_dtype, threads)
        pt_load, st_load = loads["pt"], loads["safetensors"]
        results["load"] = {"weights_bytes": weight_bytes, "pt": pt_load, "safetensors": st_load, "page_cache": "warm",
                           "safetensors_over_pt_time": st_load["seconds"] / pt_load["seconds"],
                           "safetensors_peak_rss_over_weights": st_load["peak_rss_bytes"] / weight_bytes,
                           "pt_peak_rss_over_weights": pt_load["peak_rss_bytes"] / weight_bytes}

        from PIL import Image
        import numpy as np

        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 255, (300, 260, 3), dtype=np.uint8)) for _ in range(3)]
        for dtype in dtypes:
            rate = measure_matmul_rate(dtype, device)
            results["yardsticks"][f"matmul_TFLOPs_{str(dtype).split('.')[-1]}"] = rate / 1e12
            # the CPU kernels side by side in one run (same yardsticks)
            kernels = ["default"]
            if packs_by_default(device, dtype):
                kernels = [_resolve_cpu_linear(k, dtype) for k in args.cpu_linear.split(",")]
                kernels = list(dict.fromkeys(kernels))  # once each, in the order given
            for cpu_linear in kernels:
                results["cases"] += time_encode_cases(cfg, dtype, device, images, rate, bandwidth, cpu_linear, args)
    finally:
        if workdir_ctx is not None:
            workdir_ctx.cleanup()
    print_table(results)
    if args.json:
        write_text_atomic(args.json, json.dumps(results, indent=2))
    return results


def print_table(results: dict) -> None:
    load = results["load"]
    y = results["yardsticks"]
    print(f"Kosmos-G bench: size={results['size']} device={results['device']} threads={results['threads']} torch={results['torch']}")
    print("yardsticks: " + ", ".join(f"{k}={v:.3g}" for k, v in y.items()))
    print(f"load (fp32 file, {load['weights_bytes'] / 2**30:.2f} GiB weights, every weight in memory, file in the "
          f"page cache, median of {load['pt']['runs']}): "
          f".pt {load['pt']['seconds']:.2f} s (peak RSS {load['pt_peak_rss_over_weights']:.2f}x weights), "
          f".safetensors {load['safetensors']['seconds']:.2f} s (peak RSS {load['safetensors_peak_rss_over_weights']:.2f}x weights), "
          f"time ratio {load['safetensors_over_pt_time']:.2f}; .safetensors before its mapped weights are read: "
          f"{load['safetensors']['lazy_seconds']:.2f} s; open without reading the weights: "
          f".pt {load['pt']['open_seconds']:.3f} s, .safetensors {load['safetensors']['open_seconds']:.3f} s")
    kernels = {"onednn": "all for oneDNN", "few-row": "prompt-token layers for the few-row kernel, others for oneDNN"}
    packing = {(c["dtype"], c["linear_layers"]): c["pack_seconds"] for c in results["cases"] if c["pack_seconds"] is not None}
    for (dtype, kernel), seconds in packing.items():
        print(f"{dtype}: linear weights packed once after loading ({kernels[kernel]}), {seconds:.2f} s")
    header = (f"{'case':<10} {'dtype':<9} {'linear':<8} {'tokens':>6} {'GFLOP':>7} {'encode s':>9} {'limit s':>8} {'ratio':>6} {'best':>5} "
              f"{'cached s':>9} {'speedup':>8} {'disk s':>7} {'CLIP-text s':>11}")
    print(header)
    print("-" * len(header))
    for c in results["cases"]:
        cached = f"{c['cached_image_seconds']:.3f}" if c["cached_image_seconds"] else "-"
        speed = f"{c['cache_speedup']:.1f}x" if c["cache_speedup"] else "-"
        print(f"{c['case']:<10} {c['dtype']:<9} {c['linear_layers']:<8} {c['tokens']:>6d} {c['flops'] / 1e9:>7.1f} {c['seconds']:>9.3f} "
              f"{c['limit_seconds']:>8.3f} {c['ratio_to_limit']:>6.2f} {c['best_ratio_to_limit']:>5.2f} {cached:>9} {speed:>8} {c['disk_cached_seconds']:>7.4f} {c['clip_text_encoder_seconds']:>11.3f}")
    print("per part: seconds (ratio to the part's own limit); sum of the part limits, a stricter limit for a"
          " case whose parts are bound differently")
    header = f"{'case':<10} {'dtype':<9} {'linear':<8} " + " ".join(f"{part:>16}" for part in PARTS) + f" {'sum of limits s':>16}"
    print(header)
    print("-" * len(header))
    for c in results["cases"]:
        cells = [f"{c['parts'][p]['seconds']:.3f} ({c['parts'][p]['ratio_to_limit']:.2f})" if p in c["parts"] else "-"
                 for p in PARTS]
        print(f"{c['case']:<10} {c['dtype']:<9} {c['linear_layers']:<8} " + " ".join(f"{cell:>16}" for cell in cells)
              + f" {c['sum_of_part_limits_seconds']:>16.3f}")
