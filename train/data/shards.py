"""WebDataset tar shards: the sample record, atomic deterministic shard writing, reading, and the
resumable shard-by-shard runner every command uses.

Determinism: tar members carry mtime 0 and fixed owner/mode, fields are written in sorted order,
PNG encoding is fixed, so the same input + seed gives byte-identical shards.
Resumability: input item i belongs to shard i // samples_per_shard. A shard's stats are written to
`NAME.stats.json`, then the tar to a temp file renamed into place (atomic); a rerun skips shards whose
`.tar` exists and counts their stored stats in the summary.
Multi-process (accelerate launch / torchrun): process RANK of WORLD_SIZE takes shards
index % WORLD_SIZE == RANK; the process that ends last writes summary.json.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import json
import logging
import os
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import webdataset as wds

from kosmosg_core.files import atomic_output, check_output_folder, write_json
from train.common.config import read_json
from train.common.folder_settings import SETTINGS_NAME, check_folder_settings, record_folder_settings

logger = logging.getLogger(__name__)

FORMAT_NAME = "kosmosg-data"
FORMAT_VERSION = 1
SUMMARY_NAME = "summary.json"
RERUN_MAY_CHANGE = ("input", "output", "count", "models.device")  # inputs may move, a rerun may extend
# always present in summaries (0 when nothing happened), other outcome names are added as they occur
STANDARD_COUNTS = ("processed", "written", "skipped_corrupt", "failed_caption", "failed_entities",
                   "failed_segmentation")


@dataclass
class Sample:
    """One training example: `meta` becomes the `json` field, `images` maps field names
    (`target.png`, `entity_0.png`, ...) to PNG bytes."""

    key: str
    meta: dict
    images: dict[str, bytes] = field(default_factory=dict)

    def to_wds(self) -> dict[str, Any]:
        if "." in self.key or "/" in self.key:
            raise ValueError(f"sample key {self.key!r} must not contain '.' or '/' (WebDataset splits on them)")
        record = {"__key__": self.key, "json": encode_meta(self.meta)}
        record.update(self.images)
        return record

    @classmethod
    def from_wds(cls, record: dict) -> "Sample":
        where = f"record {record.get('__key__')!r} of {os.path.basename(str(record.get('__url__', '?')))}"
        if "json" not in record:
            raise ValueError(f"{where} is not a kosmosg-data sample (no .json member; fields: "
                             f"{sorted(k for k in record if not k.startswith('_'))}): this command reads shards "
                             "written by python -m train.data (build, ingest-*, mix; docs/data-format.md).")
        try:
            meta = json.loads(record["json"])
        except ValueError as e:
            raise ValueError(f"{where}: its .json member is not valid JSON ({e}).") from e
        images = {k: bytes(v) for k, v in record.items() if not k.startswith("_") and k != "json"}
        return cls(key=record["__key__"], meta=meta, images=images)


def encode_meta(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def sanitize_key(text: str) -> str:
    """A WebDataset-safe key fragment: no dots or slashes (they would split the key), at most 80 characters: a
    longer one keeps its start and its end (where a line number or an index sits: cutting the end made the lines
    of a TSV with a long name one key) and a hash of the whole text between them (two texts differing only in the
    middle, e.g. folders batch_0001/ and batch_0002/ of a long path, stay two keys)."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in text) or "x"
    if len(safe) <= 80:
        return safe
    return f"{safe[:35]}_{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}_{safe[-35:]}"


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def resolve_shards(spec: str | list[str]) -> list[str]:
    """A directory (its *.tar, sorted), a glob, a comma-separated list, or one file -> tar paths."""
    if isinstance(spec, list):
        specs = spec
    else:  # an existing path is one item even when its name holds "," (or glob characters)
        specs = [str(spec)] if os.path.exists(str(spec)) else [s for s in str(spec).split(",") if s]
    paths: list[str] = []
    for item in specs:
        if os.path.isdir(item):
            paths.extend(sorted(glob.glob(os.path.join(glob.escape(item), "*.tar"))))
        elif os.path.isfile(item):
            paths.append(item)
        elif any(ch in item for ch in "*?["):
            paths.extend(sorted(glob.glob(item)))
        else:
            raise ValueError(f"shards {item!r}: not a directory, glob or file; give the folder holding *.tar shards")
    if not paths:
        raise ValueError(f"shards {spec!r}: no .tar files found")
    return paths


def _every_shard(urls):
    """Node/worker splitter that keeps every shard (the caller decides who processes what)."""
    return urls


# A shard that is damaged or no tar at all (webdataset re-raises these as it meets them, after the good records).
# Not OSError: a missing file or a network mount's I/O error is not the shard's fault - skipping on it would drop
# data for that pass only, so the caller stops instead (and a rerun / resume is exact).
UNREADABLE_SHARD_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


def open_shard(path: str):
    """One shard's records, with webdataset's node / worker splitting off: the callers split the data between
    processes themselves (webdataset's default splitters refuse to run under torch.distributed)."""
    return wds.WebDataset([path], shardshuffle=False, empty_check=False, nodesplitter=_every_shard,
                          workersplitter=_every_shard)


def iter_records(spec: str | list[str], split_by_node: bool = False, split_by_worker: bool = False) -> Iterator[dict]:
    """Raw WebDataset records (field -> bytes), in shard order, nothing decoded.

    By default every process reads every shard: `run_sharded` groups the *items* into output shards
    and splits those by rank, so each rank must see the whole input stream. The splitters are always
    given explicitly because webdataset's default refuses to run once a launcher sets WORLD_SIZE > 1
    or torch.distributed is initialised ("you need to add an explicit nodesplitter").
    `split_by_node=True` gives process RANK the shards RANK, RANK + WORLD_SIZE, ...;
    `split_by_worker=True` does the same across DataLoader workers.
    """
    urls = resolve_shards(spec)
    if split_by_node:
        urls = list(wds.split_by_node(urls))
    if split_by_worker:
        urls = list(wds.split_by_worker(urls))
    for url in urls:  # one dataset per shard: an unreadable shard is skipped (logged), not the end of the run
        try:
            yield from open_shard(url)
        except UNREADABLE_SHARD_ERRORS as e:
            logger.warning("skipping (the rest of) shard %s: it cannot be read (%s: %s); it is not a tar file or is "
                           "truncated", url, type(e).__name__, e)


def read_samples(spec: str | list[str], split_by_node: bool = False, split_by_worker: bool = False) -> Iterator[Sample]:
    for record in iter_records(spec, split_by_node=split_by_node, split_by_worker=split_by_worker):
        yield Sample.from_wds(record)


def write_shard(path: str, samples: Iterable[Sample]) -> int:
    """Write samples to `path` atomically (a killed run never leaves a partial shard). -> the sample count."""
    count = 0
    with atomic_output(path) as tmp, open(tmp, "wb") as stream:
        writer = wds.TarWriter(stream, encoder=False, mtime=0.0, user="kosmosg", group="kosmosg")
        try:
            for sample in samples:
                writer.write(sample.to_wds())
                count += 1
        except BaseException:
            # closed now, its flush failing quietly: else tarfile's stream flushes again when collected and prints
            # "Exception ignored in _Stream.__del__" after the error (a full disk)
            with contextlib.suppress(Exception):
                writer.close()
            raise
        writer.close()
    return count


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (accelerate launch / torchrun)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _grouped(items: Iterable[Any], size: int) -> Iterator[tuple[int, list[Any]]]:
    group: list[Any] = []
    index = 0
    for item in items:
        group.append(item)
        if len(group) == size:
            yield index, group
            index, group = index + 1, []
    if group:
        yield index, group


# Process functions return (sample or None, outcome name); "written" is counted by the runner.
ProcessResult = tuple["Sample | None", str]


def run_sharded(items: Iterable[Any], process: Callable[[Any], ProcessResult], output: str,
                samples_per_shard: int, prefix: str = "shard", what: str = "data", settings: dict | None = None) -> dict:
    """Process `items` group by group into shards under `output`, skipping finished shards.

    `settings` (the command's config as a dict) must match those that made the shards already there (but for
    `RERUN_MAY_CHANGE`); they are recorded with the first shard (`train.common.folder_settings`).

    `process(item)` must not raise for bad data: it returns (None, reason). An exception escaping
    it is still caught, logged and counted as `failed_other`, so one item never kills the run.
    Returns the summary over all finished shards in `output` and this process's counts (`this_run`); the
    summary is also written to summary.json by the process that ends last.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard}: must be at least 1")
    check_output_folder(output, "--output")
    created = not os.path.lexists(output)
    os.makedirs(output, exist_ok=True)
    try:
        return _run_sharded(items, process, output, samples_per_shard, prefix, what, settings)
    except BaseException:
        if created:  # a run refused (bad input, Ctrl-C) before its first shard leaves no empty --output behind
            with contextlib.suppress(OSError):
                os.rmdir(output)
        raise


def _run_sharded(items: Iterable[Any], process: Callable[[Any], ProcessResult], output: str,
                 samples_per_shard: int, prefix: str, what: str, settings: dict | None) -> dict:
    if settings is not None:
        check_folder_settings(output, settings, RERUN_MAY_CHANGE)
        _check_made_here(output)
    _remove_old_partial_files(output)  # after the check: in a folder it refuses, nothing is touched
    rank, world = distributed_rank()
    run_counts: Counter = Counter()
    group_sizes: list[int] = []  # of every shard of the run, every process's
    for index, group in _grouped(items, samples_per_shard):
        group_sizes.append(len(group))
        if index % world != rank:
            continue
        if _is_finished(output, prefix, index, len(group)):
            run_counts["shards_skipped_complete"] += 1
            continue
        path = os.path.join(output, shard_name(prefix, index))
        if os.path.exists(path) and os.path.exists(_stats_path(path)):  # finished, with another size: rewritten,
            _check_not_shrinking(output, prefix, index + 1)  # unless it was not the earlier build's last shard
        counts: Counter = Counter()
        samples = []
        for item in group:
            counts["processed"] += 1
            try:
                sample, outcome = process(item)
            except Exception:  # noqa: BLE001 - last line of defence, logged with traceback
                logger.exception("%s: unexpected failure on item %r; skipped", what, getattr(item, "key", item))
                sample, outcome = None, "failed_other"
            if sample is None:
                counts[outcome] += 1
            else:
                samples.append(sample)
                counts["written"] += 1
        if settings is not None:
            record_folder_settings(output, settings)
        write_json(_stats_path(path), dict(sorted(counts.items())))  # before the tar: a tar implies stats
        write_shard(path, samples)
        run_counts.update(counts)
        run_counts["shards_written"] += 1
        logger.info("%s: wrote %s (%d samples, %s)", what, os.path.basename(path), counts["written"],
                    ", ".join(f"{k}={v}" for k, v in sorted(counts.items()) if k not in ("written",)))
    if run_counts["shards_skipped_complete"]:
        logger.info("%s: kept %d finished shard(s) in %s from an earlier run with the same settings", what,
                    run_counts["shards_skipped_complete"], output)
    # Several processes: summary.json is written by a process that sees every shard of the run finished (the
    # last to end; any that sees them all computes the same totals). Checked before summing: a process that
    # summed first could write its totals over a complete summary after another process's last shard.
    _check_not_shrinking(output, prefix, len(group_sizes))  # a smaller --count ending on a shard boundary
    run_finished = all(_is_finished(output, prefix, index, size) for index, size in enumerate(group_sizes))
    summary = summarize(output, prefix)
    if run_finished:
        write_json(os.path.join(output, SUMMARY_NAME), summary)
    logger.info("%s summary: %s", what, json.dumps(summary, sort_keys=True))
    summary["this_run"] = dict(sorted(run_counts.items()))  # this process's work
    return summary


def _stats_path(shard_path: str) -> str:
    return shard_path[: -len(".tar")] + ".stats.json"


def _check_not_shrinking(output: str, prefix: str, num_shards: int) -> None:
    """A rerun may extend a build (a larger --count), not shrink it: the shards past the new end would stay, and the
    folder would hold neither build. Called before a finished shard is rewritten with another size (with
    `num_shards` = its index + 1: only the earlier build's last, shorter shard may be) and at the end."""
    if os.path.exists(os.path.join(output, shard_name(prefix, num_shards))):
        raise ValueError(f"{output} holds shards past the {num_shards} this run makes (e.g. "
                         f"{shard_name(prefix, num_shards)}): it was built with a larger --count. A rerun may extend "
                         "a build, not shrink it; use a new --output, or the larger --count.")


def _is_finished(output: str, prefix: str, index: int, size: int) -> bool:
    """Shard `index` is there with all its `size` items (the shorter last shard of a run with a smaller
    --count is not: it is made again)."""
    path = os.path.join(output, shard_name(prefix, index))
    return os.path.exists(path) and os.path.exists(_stats_path(path)) and \
        read_stats(_stats_path(path)).get("processed") == size


def _check_made_here(output: str) -> None:
    """A folder this command writes shards into holds only what an earlier run with the recorded settings.json made:
    refuse one with files but no settings.json (the user's own shards, or the input folder itself: a review saw
    `--output` = `--input` overwrite the input shard shard-000000.tar)."""
    names = os.listdir(output)  # one look: another rank may record settings.json meanwhile
    if SETTINGS_NAME in names:
        return
    # hidden files (.DS_Store, .gitkeep, a killed writer's temp file) and a fresh file system's lost+found hold no data
    held = sorted(name for name in names if not name.startswith(".") and name != "lost+found")
    if held:
        raise ValueError(f"--output {output} is not empty ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}) and "
                         f"holds no {SETTINGS_NAME}, so no run of this command made it: its files could be "
                         "overwritten. Give a new or empty folder (not the input's).")


def _remove_old_partial_files(output: str) -> None:
    """`NAME.partial` files that versions before the core's atomic_output left when killed: never read."""
    for leftover in glob.glob(os.path.join(glob.escape(output), "*.partial")):
        logger.info("removing %s (a killed run's half-written file)", leftover)
        with contextlib.suppress(FileNotFoundError):
            os.remove(leftover)


def read_stats(stats_path: str) -> dict:
    """A shard's counts (its NAME.stats.json)."""
    return read_json(stats_path, dict, "the counts of its shard ({\"processed\": N, ...})",
                     "Delete it and its .tar to have that shard made again.")


def summarize(output: str, prefix: str = "shard") -> dict:
    """Totals over every finished shard's stats in `output` (all runs, all ranks)."""
    totals: Counter = Counter()
    shards = 0
    for tar in sorted(glob.glob(os.path.join(glob.escape(output), f"{glob.escape(prefix)}-*.tar"))):
        stats_path = _stats_path(tar)
        if os.path.exists(stats_path):
            totals.update(read_stats(stats_path))
            shards += 1
    summary = dict.fromkeys(STANDARD_COUNTS, 0)
    summary.update(totals)
    summary["shards"] = shards
    return dict(sorted(summary.items()))
