"""Where training numbers go (rank 0 only): ``RUN/metrics.jsonl`` (one JSON object per logged step), a tqdm
progress bar, and TensorBoard when the optional ``tensorboard`` package is installed."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``RUN/metrics.jsonl``; a line that is not a JSON object (a write torn by a crash) is skipped
    with a warning."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            out.append(record)
        else:
            log.warning("%s line %d is not a JSON record (a torn write?); skipped", path, n)
    return out


class Metrics:
    """Append-only metrics with a progress bar. On resume, records after the checkpoint's step are dropped
    (they belong to the part of the run being redone)."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int, progress: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.bar = None
        self.tb = None
        if not enabled:
            return
        kept = [r for r in read_metrics(run_dir) if isinstance(r.get("step"), int) and r["step"] <= start_step]
        tmp = self.path.with_name(f".{METRICS_FILE}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        self.fh = open(self.path, "a")
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        else:
            log.debug("tensorboard is not installed; metrics go to %s only", self.path)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])
        if self.bar is not None:
            shown = {k: record[k] for k in ("loss", "val_loss", "lr", "tokens_per_s") if k in record}
            self.bar.set_postfix({k: f"{v:.3g}" if k != "tokens_per_s" else f"{v:,.0f}" for k, v in shown.items()},
                                 refresh=False)
        if "val_loss" in record:
            log.info("step %d: loss %.4f, val_loss %.4f (ppl %.2f)", record["step"], record["loss"],
                     record["val_loss"], record["val_ppl"])

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if not self.enabled:
            return
        self.fh.close()
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


__all__ = ["Metrics", "read_metrics", "METRICS_FILE"]
