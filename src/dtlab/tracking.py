"""Weights & Biases: the logger dtlab trains with, and a reader for offline runs.

The logger runs offline into the run dir when there are no credentials (upload later with
`wandb sync`), falls back to offline when W&B cannot start, names and groups the runs of a
Hydra multirun, and finishes its run when told (one W&B run per Hydra job).

The reader parses an offline run's `run-*.wandb` file, which wandb's public API only reads
after `wandb sync`: `python -m dtlab.tracking outputs/multirun/...` prints one line per run.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment

log = logging.getLogger(__name__)


def has_credentials() -> bool:
    """An API key in WANDB_API_KEY or in the netrc entry that `wandb login` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger with dtlab's defaults. `mode` null: WANDB_MODE if set, else
    online with credentials and offline without. `group` null: in a Hydra multirun, the sweep
    dir's name, so a sweep's jobs group together. `name` null: the job's overrides (e.g.
    `model=tiny,seed=1`). Other arguments go to Lightning's WandbLogger and `wandb.init`."""

    def __init__(self, mode: str | None = None, group: str | None = None, name: str | None = None, **kwargs: Any):
        self.offline_reason = None
        if mode is None and not os.environ.get("WANDB_MODE") and not has_credentials():
            mode, self.offline_reason = "offline", "no W&B credentials (wandb login or WANDB_API_KEY)"
        if HydraConfig.initialized():
            hydra = HydraConfig.get()
            if group is None and hydra.mode == RunMode.MULTIRUN:
                group = Path(hydra.sweep.dir).name
            name = name or hydra.job.get("override_dirname") or None
        super().__init__(mode=mode, group=group, name=name, **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self):  # noqa: ANN201 - wandb's Run
        if self._experiment is not None or getattr(self, "_attach_id", None):
            return super().experiment  # started already, or attaching in a DDP spawn worker
        try:
            run = super().experiment
        except Exception as e:  # noqa: BLE001 - no network, server down, bad key...: keep training
            reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            self.offline_reason = f"W&B could not start ({type(e).__name__}: {reason})"
            self._wandb_init["mode"] = "offline"  # Lightning keeps wandb.init's arguments here
            run = super().experiment
        if run.offline:
            why = self.offline_reason or ("WANDB_MODE=offline" if os.environ.get("WANDB_MODE") else "mode=offline")
            log.warning("W&B: logging offline (%s); upload later with: wandb sync %s", why, run.settings.sync_dir)
        return run

    def finish(self, failed: bool = False) -> None:
        """End this job's W&B run: an unfinished run would be reused by the next job of an
        in-process multirun (optuna, the basic launcher)."""
        if self._experiment is not None:
            self._experiment.finish(exit_code=1 if failed else 0)
            self._experiment = None


def _records(path: Path) -> Iterator[Any]:
    """The `Record` messages of a run file: a LevelDB-style log of 32 KiB blocks after a 7-byte
    file header; each chunk has a 7-byte header (crc32c, length, type) and a record longer than
    the rest of its block continues over FIRST, MIDDLE.., LAST chunks."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block, pos, pending = path.read_bytes(), 32 * 1024, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left for a header: the block is padded
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zeroed tail of a run still being written
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # 1 FULL, 2 FIRST, 3 MIDDLE, 4 LAST
        if kind in (1, 4):
            yield Record.FromString(pending)


def _set(tree: dict, item: Any) -> None:
    """Store an item (a key, or a nested key for media and dotted metrics) with its JSON value."""
    *parents, leaf = list(item.nested_key) or [item.key]
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = json.loads(item.value_json)


def read_offline_run(run_dir: str | Path) -> dict:
    """An offline run dir (`.../wandb/offline-run-*`) as {"id", "project", "group", "name",
    "config", "history" (one dict per logged step), "summary", "artifacts" (name, type, aliases,
    files)}."""
    (path,) = Path(run_dir).glob("run-*.wandb")
    run: dict[str, Any] = {"config": {}, "history": [], "summary": {}, "artifacts": []}
    for record in _records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run |= {"id": r.run_id, "project": r.project, "group": r.run_group, "name": r.display_name}
            for item in r.config.update:
                _set(run["config"], item)
        elif kind == "config":
            for item in record.config.update:
                _set(run["config"], item)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set(row, item)
            run["history"].append(row)
        elif kind == "summary":
            for item in record.summary.update:
                _set(run["summary"], item)
        elif kind == "artifact":
            a = record.artifact
            files = [entry.path for entry in a.manifest.contents]
            run["artifacts"].append({"name": a.name, "type": a.type, "aliases": list(a.aliases), "files": files})
    run["config"].pop("_wandb", None)
    return run


def main() -> None:
    """Print group, name, id and the last and best eval/normalized_score of every offline run
    under the dirs given (default: the current one)."""
    for root in sys.argv[1:] or ["."]:
        for run_dir in sorted(Path(root).rglob("offline-run-*")):
            s = read_offline_run(run_dir)
            summary = s["summary"]
            last, best = summary.get("eval/normalized_score"), summary.get("eval/normalized_score_best")
            print(f"{s['group'] or '-':<24} {s['name'] or '-':<40} {s['id']}  last {last}  best {best}  {run_dir}")


if __name__ == "__main__":
    main()
