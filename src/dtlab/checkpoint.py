"""Checkpoints: written so that no crash can truncate them and a full disk says so in one
line, saved on preemption, and read back through one loader (`read_checkpoint`: no pickled code,
no non-finite weights) for resuming, evaluation and export.

A run's checkpoints live in `paths.checkpoints_dir` (`<run dir>/checkpoints/`): `last.ckpt`
(every `callbacks.checkpoint.every_n_train_steps` steps, at the end, and on SIGTERM) and
`best.ckpt`. Each holds the run's resolved config (`checkpoint["dtlab"]["config"]`), so that a
resume with other settings is refused (`resume_path`).
"""

from __future__ import annotations

import errno
import inspect
import io
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import get_object
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dtlab import DTLabError
from dtlab.cli import find_checkpoint
from dtlab.module import PolicyModule

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside its target, syncs it to disk, then
    renames it over the target, so a crash or kill mid-save leaves the previous file whole.
    (Lightning's own writer stages the file in the system temp dir; when that is another
    filesystem than the run dir, as on most clusters, the final move is a copy, not a rename.)
    The checkpoint is serialized in memory first, so a disk without room for it is told in one
    line before a byte is written; a write that fails anyway (quota, file size limit) is told
    the same way. Reads go through `read_checkpoint`. Local paths only."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getbuffer()
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # the old file stays until the rename, so the new one needs its whole size free
            free = shutil.disk_usage(path.parent).free
            if free < len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else 0
            raise DTLabError(
                f"checkpoint {path} cannot be written ({e.strerror}): it needs {_size(len(data))} and "
                f"{path.parent} has {_size(free)} free; the checkpoints already there are intact. Free space "
                "(or set paths.checkpoints_dir=DIR elsewhere), then resume with the same overrides and "
                f"ckpt_path={path.parent / 'last.ckpt'}"
            ) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        # what Lightning restores a resumed run from (resume_path checked it is dtlab's), and
        # under ddp_spawn its own temporary weights file: no pickled code, no non-finite weights
        return read_checkpoint(path, dtlab_only=False)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.0f} kB"


class Checkpoint(ModelCheckpoint):
    """ModelCheckpoint that also writes `last.ckpt` when the run is stopped by SIGTERM (cluster
    preemption) and whenever training ends on a step it has not saved yet.

    Lightning's answer to SIGTERM is to finish the current step and raise SIGTERMException,
    saving nothing. It raises it after every callback of the step has run, so the state saved
    here is as consistent as a periodic checkpoint. Other exceptions save nothing: a step that
    failed halfway (a non-finite loss, a bug) must not replace the last good checkpoint."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self._save_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # ModelCheckpoint saves last.ckpt at the end only if it never saved before: a run of 25
        # steps with a checkpoint every 10 would end with the one from step 20.
        self._save_last(trainer)

    def adopt(self, ckpt_path: str) -> None:
        """Before a resume: this dir's last.ckpt is this run's own, to be replaced as training
        goes on. Lightning takes a last.ckpt it did not write (or whose run dir has moved since)
        for someone else's and saves last-v1.ckpt beside it, which the final evaluation would
        never read. Resuming from another run dir's checkpoint, last.ckpt starts as a copy of it,
        so the new dir is whole from the start (`ckpt_path=last` resumes it; the final
        evaluation finds last.ckpt even when no step is left to train and Lightning saves none).
        Every DDP rank sets the path (Lightning's save compares it on each), rank 0 copies."""
        last = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)
        if Path(ckpt_path).resolve() != Path(last).resolve() and rank_zero_only.rank == 0:
            Path(last).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(last).with_name(f".{Path(last).name}.tmp")
            shutil.copy2(ckpt_path, tmp)
            os.replace(tmp, last)
        self.last_model_path = last

    def _save_last(self, trainer: L.Trainer) -> None:
        if self._last_global_step_saved != trainer.global_step:  # not saved at this step yet
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def evaluation_due(step: int, every_n_steps: int, max_steps: int) -> bool:
    """The in-training evaluation schedule: every `every_n_steps` steps (0: never) and at the
    last step. best.ckpt (dtlab.checkpoint.BestCheckpoint) is saved on the same schedule."""
    return (every_n_steps > 0 and step % every_n_steps == 0) or step >= max_steps


def checkpoint_facts(saved: dict) -> tuple[int | None, list[int] | None, dict | None]:
    """A dtlab checkpoint's training step, the env seeds its in-training evaluations used, and
    how its run's final evaluation runs (episodes, seed, backend, workers, threads: what
    dtlab.evaluate repeats); None for what a checkpoint predates. `saved` as `read_checkpoint`
    returns it."""
    selection = final = None
    for key, state in saved.get("callbacks", {}).items():
        if key.startswith("EvaluationCallback") and isinstance(state, dict):
            selection, final = state.get("selection_seeds"), state.get("final_evaluation")
    return saved.get("global_step"), selection, final


class BestCheckpoint(ModelCheckpoint):
    """best.ckpt: the weights of the best in-training evaluation so far (`monitor`). It saves on
    the evaluation callback's own schedule, every `every_n_steps` steps and at the last step,
    so the extra evaluation at the last step competes too; ModelCheckpoint's
    every_n_train_steps would skip it (and with eval.every_n_steps=0 never save at all).
    Checkpoint callbacks run after the others, so the evaluation of this step is in."""

    def __init__(self, every_n_steps: int, **kwargs: Any) -> None:
        super().__init__(every_n_train_steps=0, every_n_epochs=0, **kwargs)  # no schedule of its own
        self.every_n_steps = every_n_steps

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        old, score = state_dict.get("best_model_path"), state_dict.get("best_model_score")
        if state_dict.get("dirpath") == self.dirpath or not old or score is None:
            return
        # Resumed into a new run dir: bring the best so far along, so that best.ckpt (and the
        # final evaluation of it) stays the best of the whole run, not of the part after resuming.
        # A run dir that moved brought it already; Lightning would take it for another run's.
        new = Path(self.dirpath) / Path(old).name
        if not Path(old).is_file() and not new.is_file():
            log.warning(
                "best.ckpt of the resumed run (%s) is not there: best.ckpt starts afresh in %s", old, self.dirpath
            )
            return
        if Path(old).is_file() and rank_zero_only.rank == 0:
            new.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(old, new)
        self.best_model_path = self.kth_best_model_path = str(new)
        self.best_model_score = self.kth_value = score
        self.best_k_models = {str(new): score}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        due = evaluation_due(trainer.global_step, self.every_n_steps, trainer.max_steps)
        if due and not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))


def read_checkpoint(path: str | Path, dtlab_only: bool = True) -> dict:
    """The one reader of checkpoints (evaluation, export, resuming, the final evaluation): the
    file's contents, or DTLabError if it is missing, unreadable, carries pickled objects other
    than tensors and plain data (`weights_only=True`: dtlab saves nothing else, so nothing is
    allow-listed; loading such a file could run code), or holds non-finite weights; with
    `dtlab_only`, also if it lacks the weights and hyperparameters dtlab writes."""
    path = find_checkpoint(path)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message names the global the file asked for, e.g. "GLOBAL posix.system"
        found = re.search(r"GLOBAL \S+", str(e))
        raise DTLabError(
            f"checkpoint {path!r} holds pickled objects that are not tensors or plain data "
            f"({found.group(0) if found else type(e).__name__}), and "
            "loading them could run code: refused unread. Use checkpoints written by dtlab.train"
        ) from None
    except Exception as e:  # noqa: BLE001 - whatever torch raises, the file is unusable
        reason = str(e).splitlines()[0][:200] if str(e) else ""
        raise DTLabError(
            f"checkpoint {path!r} cannot be loaded ({type(e).__name__}: {reason}): "
            "is it a complete checkpoint written by dtlab.train?"
        ) from None
    if dtlab_only and (not isinstance(saved, dict) or "state_dict" not in saved or "hyper_parameters" not in saved):
        raise DTLabError(f"checkpoint {path!r} is not a dtlab checkpoint (no weights or hyperparameters)")
    for name, value in saved.get("state_dict", {}).items():
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise DTLabError(
                f"checkpoint {path!r} has non-finite weights ({bad} of {value.numel()} values of {name} are NaN or "
                "Inf): refused; evaluate or resume from an earlier checkpoint of the run"
            )
    return saved


def module_from_checkpoint(saved: dict, device: str | torch.device = "cpu") -> PolicyModule:
    """The PolicyModule in a checkpoint `read_checkpoint` returned (what Lightning's
    load_from_checkpoint does, without reading the file again)."""
    accepted = inspect.signature(PolicyModule.__init__).parameters
    module = PolicyModule(**{k: v for k, v in saved["hyper_parameters"].items() if k in accepted})
    module.on_load_checkpoint(saved)
    module.load_state_dict(saved["state_dict"])
    return module.to(device)


def load_checkpoint(path: str | Path) -> PolicyModule:
    """The PolicyModule in a checkpoint written by dtlab.train; DTLabError if it is missing or unusable."""
    return module_from_checkpoint(read_checkpoint(path))


# Settings a resume may change: how the run is executed and logged, not what it computes (the
# checkpoint's config is compared key by key with the resumed one, everything else must match).
RESUME_MAY_DIFFER = (
    "ckpt_path",
    "threads",
    "tags",
    "optimized_metric",
    "paths",
    "logger",
    "callbacks",  # checkpoint interval, progress bar; the evaluation's settings are eval.*'s
    "eval.backend",
    "eval.workers",
    "eval.vector_mode",
    "eval.video",
    "eval.video_frames",
    "trainer.accelerator",  # the same run on another machine; trainer.devices changes the batch
    "trainer.enable_progress_bar",
    "trainer.log_every_n_steps",
    "trainer.default_root_dir",
    "trainer.plugins",
)
# where a dataset lives may change (another machine); what it holds is compared by its episode returns
DATA_LOCATION = ("path", "data_dir", "cache_dir", "root", "download")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}


def _may_differ(key: str) -> bool:
    key = key.rstrip(".")
    if any(key == p or key.startswith(f"{p}.") for p in RESUME_MAY_DIFFER):
        return True
    return key.startswith("dataset.") and key.rsplit(".", 1)[-1] in DATA_LOCATION


def _same_object(a: Any, b: Any) -> bool:
    """Whether two `_target_`s name one object (a name kept as an alias after a move or rename)."""
    try:
        return get_object(a) is get_object(b)
    except Exception:  # noqa: BLE001 - a name that no longer imports is another object
        return False


def resume_path(ckpt_path: str | None, module: PolicyModule, run_config: dict | None = None) -> str | None:
    """The checkpoint to resume from (a file `dtlab.train.find_checkpoint` found), checked
    before any training step: it loads, and it was trained with this run's settings. Lightning
    would restore its weights, optimizer and schedules over any changed setting, so a run
    whose LR schedule, data, targets, evaluation seeds or online settings changed midway
    would pass for one run. Compared: the module's hyperparameters (against `module`, the
    fresh module of this config), the training data (its episode returns), and every key of
    the resolved `run_config` that is not in RESUME_MAY_DIFFER. `trainer.max_steps` may change
    when the LR schedule does not read it (lr_schedule=constant), to lengthen a run.
    Checkpoints written before dtlab saved the run's config (0.2.0 and earlier) are checked on
    their hyperparameters and data alone, with a warning."""
    if ckpt_path is None:
        return None
    saved = read_checkpoint(ckpt_path)
    hparams = saved["hyper_parameters"]
    extra = saved.get("dtlab") or {}
    # A key the checkpoint predates was at its constructor default when it was written.
    defaults = {k: p.default for k, p in inspect.signature(type(module).__init__).parameters.items()}
    changed: dict[str, tuple[Any, Any]] = {}
    old_returns, new_returns = extra.get("episode_returns"), module.episode_returns
    data_changed = old_returns is not None and new_returns is not None and old_returns != new_returns
    if data_changed:
        summary = [f"{len(r)} episodes, mean return {sum(r) / len(r):.1f}" for r in (old_returns, new_returns)]
        changed["the training data"] = (summary[0], summary[1])
    derived_from_data = ("state_mean", "state_std")
    for key, value in module.hparams.items():
        old = hparams.get(key, defaults.get(key))
        if old != value and not (data_changed and key in derived_from_data):
            changed[key] = (old, value)
    config = extra.get("config")
    if config is None and run_config is not None:
        log.warning(
            "checkpoint %s predates the run config dtlab saves in checkpoints (dtlab 0.2.0 and earlier): only its "
            "model settings and data are checked against this run's",
            ckpt_path,
        )
    elif run_config is not None:
        old_flat, new_flat = _flatten(config), _flatten(run_config)
        for key in old_flat.keys() & new_flat.keys():  # a key one side predates is not compared
            name = key.rstrip(".")
            if old_flat[key] == new_flat[key] or _may_differ(name):
                continue
            if name.startswith("model.") and name[len("model.") :] in module.hparams:
                continue  # compared as a hyperparameter above
            if name.endswith("._target_") and _same_object(old_flat[key], new_flat[key]):
                continue  # a class under its new name and its old one (DTModule: PolicyModule)
            changed[name] = (old_flat[key], new_flat[key])
    steps = changed.get("trainer.max_steps")
    if steps and hparams.get("lr_schedule", "constant") == "constant" and steps[1] > saved["global_step"]:
        del changed["trainer.max_steps"]  # the constant schedule does not read it
        log.warning(
            "resuming with trainer.max_steps=%d (the checkpoint's run had %d): the constant LR schedule does not "
            "depend on it; the run's last-step evaluation moves with it",
            steps[1],
            steps[0],
        )
    if changed:
        data = changed.pop("the training data", None)
        listed = "; ".join(
            ([f"the training data differs ({data[0]} there, {data[1]} here: the dataset changed)"] if data else [])
            + [
                f"{key}={old!r} there, {new!r} here" if len(repr(old)) + len(repr(new)) <= 80 else f"{key} differs"
                for key, (old, new) in sorted(changed.items())
            ]
        )
        raise DTLabError(
            f"checkpoint {ckpt_path!r} was trained with other settings ({listed}): resume with the config it was "
            "trained with, or start a new run instead (drop ckpt_path, and hydra.run.dir for a fresh run dir)"
        )
    return ckpt_path
