"""The training data as the loop reads it: a deterministic, resumable stream of raw WebDataset records.

Data order is a pure function of (seed, epoch): shards in a seeded permutation, the records of a shard in a seeded
shuffle; the position (epoch, shard cursor, record offset) is what a checkpoint stores. Each `Record` carries the
key its per-sample draws are seeded by (`sample_id`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from train.common.seeds import sample_rng

logger = logging.getLogger(__name__)


@dataclass
class Record:
    """One raw WebDataset record plus where it sits in the stream (for per-sample seeds)."""

    key: str
    epoch: int
    fields: dict
    shard: str = ""  # the shard file's name, for messages
    # the sample as its per-sample draws know it: its key, qualified by its folder's number past the first folder of
    # --data (each build numbers its samples from 00000000: two folders' samples would draw alike)
    sample_id: str = ""

    def __post_init__(self):
        self.sample_id = self.sample_id or self.key

    @property
    def meta(self) -> dict:
        """The sample's json (docs/data-format.md). A field of another JSON type is a ValueError naming it, so the
        sample is skipped like one with a missing field (a TypeError deep in a stage is left to be a bug)."""
        meta = json.loads(self.fields["json"])
        if not isinstance(meta, dict):
            raise ValueError(f"its json is a {type(meta).__name__}, not an object")
        for name, types in _META_FIELD_TYPES.items():
            if name in meta and not isinstance(meta[name], types):
                raise ValueError(f"its json field {name!r} is {meta[name]!r:.40}, not {_type_names(types)}")
        for entity in meta.get("entities", []):
            if not isinstance(entity, dict) or not isinstance(entity.get("image"), str) or \
                    not isinstance(entity.get("masked"), (str, type(None))):
                raise ValueError(f"its json entity {entity!r:.60} is not {{\"image\": field, \"masked\": field or null}}")
        return meta


_META_FIELD_TYPES = {"kind": str, "caption": str, "text": str, "text_dropped": str, "entities": list,
                     "variants": (int, type(None))}  # as train.data writes them (stage 1 reads a laion caption as text)


def _type_names(types) -> str:
    names = {str: "text", int: "a whole number", list: "a list", type(None): "null"}
    return " or ".join(names[t] for t in (types if isinstance(types, tuple) else (types,)))


SHARD_FINGERPRINT_BYTES = 2**16  # read from each end of a shard to fingerprint it (hundreds of shards: ~0.1 GB)


class RecordStream:
    """Deterministic, resumable stream of raw records over WebDataset shards (repeats epochs).

    Only one shard is held in memory at a time; resuming re-reads one shard and skips to the offset."""

    def __init__(self, data: str, seed: int, rank: int = 0, world_size: int = 1, split: str = "samples"):
        from train.data.shards import resolve_shards

        if not data:
            raise ValueError("No training data: pass --data with a folder, glob or list of WebDataset .tar shards "
                             "(python -m train.data writes them).")
        if split not in ("samples", "shards"):
            raise ValueError(f"data_split={split!r}: use 'samples' or 'shards'.")
        shards = resolve_shards(data)
        # the folder each shard comes from, numbered in --data's order (0: the first); for `Record.sample_id`
        folders = list(dict.fromkeys(os.path.dirname(os.path.abspath(path)) for path in shards))
        self._folder_number = {path: folders.index(os.path.dirname(os.path.abspath(path))) for path in shards}
        self._qualify = True  # False: a run begun before sample ids told folders apart goes on drawing as it did
        if split == "shards":
            shards = shards[rank::world_size]
            if not shards:
                raise ValueError(f"data_split=shards: process {rank} of {world_size} gets no shard ({data} has fewer "
                                 "shards than processes); use data_split=samples or write more shards.")
        self.shards, self.seed = shards, seed
        self._fingerprints: list[str] | None = None
        self._damaged: set[int] = set()  # indices into self.shards of shards found damaged: a resume may find them rebuilt
        self.epoch, self.cursor, self.offset = 0, 0, 0
        self._records: list[tuple[str, dict]] | None = None
        self._shard_name = self._shard_path = ""  # of the loaded records
        self._empty_epochs = 0

    def shard_fingerprints(self) -> list[str]:
        """Each shard's content (`content_fingerprint` of its first and last 64 KiB and size), in order, once: every
        build names its shards shard-000000.tar..., so names alone do not tell two datasets apart."""
        if self._fingerprints is None:
            from kosmosg_core.files import content_fingerprint

            self._fingerprints = [content_fingerprint(path, SHARD_FINGERPRINT_BYTES) for path in self.shards]
        return self._fingerprints

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "offset": self.offset, "num_shards": len(self.shards),
                "shard_names": [os.path.basename(path) for path in self.shards],
                "shard_fingerprints": self.shard_fingerprints(), "damaged_shards": sorted(self._damaged),
                "sample_ids": "by-folder" if self._qualify else "by-key"}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_shards") != len(self.shards):
            raise ValueError(f"The checkpoint's data position is for {state.get('num_shards')} shards but --data now "
                             f"gives {len(self.shards)}; resume with the same --data (and data_split).")
        names = [os.path.basename(path) for path in self.shards]
        if "shard_names" in state and state["shard_names"] != names:  # the folder may move, its shards may not
            missing = sorted(set(state["shard_names"]) - set(names)) or ["(the same names in another order)"]
            raise ValueError(f"--data holds other shards than the run was trained on (not there: {missing[0]}); "
                             "resume with the run's data.")
        saved = state.get("shard_fingerprints")  # checkpoints before them: names only
        rebuilt = set(state.get("damaged_shards", []))  # a shard the run found damaged may since be rebuilt
        differ = [k for k, (a, b) in enumerate(zip(saved or [], self.shard_fingerprints())) if a != b and k not in rebuilt]
        if differ:
            k = differ[0]
            moved = self.shard_fingerprints()[k] in saved
            raise ValueError(f"--data holds other shards than the run was trained on: shard {k + 1}, {names[k]}, "
                             f"{'is another of them (the same shards in another order)' if moved else 'has other content'}"
                             "; resume with the run's data, in its order.")
        self.epoch, self.cursor, self.offset = int(state["epoch"]), int(state["cursor"]), int(state["offset"])
        self._qualify = state.get("sample_ids", "by-key") == "by-folder"
        if not self._qualify and any(self._folder_number[path] for path in self.shards):  # checkpoints before them
            logger.warning("resuming a run begun before the samples of a second --data folder drew apart from the "
                           "first's: it goes on as it began (same-key samples of the folders draw alike), so the "
                           "resume is exact; a new run draws them apart")
        self._records = None

    def _order(self) -> list[str]:
        order = list(self.shards)
        sample_rng(self.seed, "shards", self.epoch).shuffle(order)
        return order

    def _load_current(self) -> list[tuple[str, dict]]:
        from train.data.shards import UNREADABLE_SHARD_ERRORS, open_shard

        path = self._order()[self.cursor]
        self._shard_name = os.path.basename(path)
        records = []
        try:
            for r in open_shard(path):
                records.append((r["__key__"], {k: v for k, v in r.items() if not k.startswith("__")}))
        except UNREADABLE_SHARD_ERRORS as e:
            self._damaged.add(self.shards.index(path))
            # skipped, not fatal: a shard is reached at any time of a run, and a resumed run needs the same shards;
            # the records before the damage are the same at every read, so the stream stays deterministic
            logger.warning("shard %s cannot be read past its first %d records (%s: %s): it is not a tar file or is "
                           "truncated; the rest of it is skipped in every epoch. Rebuild it with python -m train.data "
                           "(a run resumed after that reads the rebuilt records).", path, len(records), type(e).__name__,
                           e)
        except OSError as e:  # a missing file, a mount's I/O error: stop here, so that the resume is exact
            raise ValueError(f"Shard {path} cannot be read ({type(e).__name__}: {e}); make it readable again, then "
                             "resume the run.") from e
        records.sort(key=lambda kv: kv[0])  # independent of tar member order
        sample_rng(self.seed, "records", self.epoch, self._qualified(os.path.basename(path), path)).shuffle(records)
        self._shard_path = path
        return records

    def _qualified(self, name: str, path: str) -> str:
        """`name` (a key, a shard's file name) as the per-sample draws see it: the first folder's as it is, another
        folder's prefixed by its number ("1/00000002"), so two builds' samples do not draw alike."""
        number = self._folder_number[path] if self._qualify else 0
        return f"{number}/{name}" if number else name

    def next(self) -> Record:
        while True:
            if self._records is None:
                self._records = self._load_current()
            if self.offset < len(self._records):
                key, fields = self._records[self.offset]
                self.offset += 1
                self._empty_epochs = 0
                return Record(key=key, epoch=self.epoch, fields=fields, shard=self._shard_name,
                              sample_id=self._qualified(key, self._shard_path))
            self._records, self.offset = None, 0
            self.cursor += 1
            if self.cursor == len(self.shards):
                self.cursor, self.epoch = 0, self.epoch + 1
                self._empty_epochs += 1
                if self._empty_epochs > 1:
                    raise ValueError(f"The shards in {self.shards[:3]}... hold no samples (or cannot be read: see the "
                                     "warnings above); check --data.")
