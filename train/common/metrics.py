"""A run's metrics.jsonl: one JSON object per logged step, appended as training goes."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from kosmosg_core.files import write_text_atomic

METRICS_NAME = "metrics.jsonl"

logger = logging.getLogger(__name__)


class MetricsLog:
    """Append-only `metrics.jsonl` in `output_dir`. Opening it for a run that starts at `resume_step`
    keeps only the lines up to that step (a killed run may have logged past its last checkpoint) and
    drops damaged ones (a line cut short when the machine went down); 0 starts an empty log."""

    def __init__(self, output_dir, resume_step: int):
        self.path = Path(output_dir) / METRICS_NAME
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    if line.strip():
                        logger.warning("%s: dropping a damaged line: %.80s", self.path, line)
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        self.start = time.time()

    def write(self, record: dict) -> None:
        """Appends `record` with `time`: seconds since this process opened the log."""
        with self.path.open("a") as f:
            f.write(json.dumps({**record, "time": round(time.time() - self.start, 3)}) + "\n")
            f.flush()


def read_metrics(output_dir) -> list[dict]:
    path = Path(output_dir) / METRICS_NAME
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
