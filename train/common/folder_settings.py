"""Output folders that runs add to (data shards, generated images): the settings that made their contents.

A rerun keeps what a folder already holds and adds the rest, so it must use the settings that made the
folder's contents: `check_folder_settings` refuses other ones by name; `record_folder_settings` writes
them (`settings.json`) when the run is about to write its first file, so a run that failed before that
(a wrong model path, say) leaves nothing that would block its corrected rerun.
"""

from __future__ import annotations

import os

from kosmosg_core.files import write_json
from train.common.config import changed_keys, changed_settings, flatten_settings, read_json

SETTINGS_NAME = "settings.json"


def check_folder_settings(folder, settings: dict, may_change=()) -> None:
    """Refuse, naming them, settings other than the ones recorded in `folder` (keys in `may_change` excepted)."""
    path = os.path.join(folder, SETTINGS_NAME)
    if not os.path.exists(path):
        return
    saved = read_json(path, dict, "the settings that made the folder's contents",
                      "Use a new output folder (or delete the folder's contents to make them again).")
    changed = changed_keys(saved, settings, may_change)
    if not changed:
        return
    described = "; ".join(changed_settings(saved, settings, may_change)[:5])
    recorded = flatten_settings(saved)
    unrecorded = [key for key in changed if key not in recorded]
    # only settings added since the folder was made differ: no flag makes what the earlier version made (with a
    # recorded one changed too, e.g. --scheduler, its recorded value may be what is meant: the usual message)
    if unrecorded and len(unrecorded) == len(changed):
        raise ValueError(f"{folder} holds output made with other settings ({described}): it was made by an earlier "
                         f"version, which did not record {', '.join(unrecorded)}, and its output may differ from what "
                         "this version makes. A rerun keeps what is there: use a new output folder, or delete the "
                         "folder's contents to make them again.")
    raise ValueError(f"{folder} holds output made with other settings ({described}); a rerun keeps what is there, so it "
                     f"needs the same settings. Use a new output folder, or the settings in {path}.")


def record_folder_settings(folder, settings: dict) -> None:
    """Write `settings.json` (atomically) unless the folder has one (then it was checked to match)."""
    path = os.path.join(folder, SETTINGS_NAME)
    if os.path.exists(path):
        return
    write_json(path, flatten_settings(settings))
