"""Checkpoints: written so that no crash can truncate them, saved on preemption, and read back
(with one-line errors) for resuming and evaluation.

A run's checkpoints live in `<run dir>/checkpoints/`: `last.ckpt` (every
`callbacks.checkpoint.every_n_train_steps` steps, at the end, and on SIGTERM) and `best.ckpt`.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dtlab import DTLabError
from dtlab.cli import find_checkpoint
from dtlab.module import DTModule

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside its target, syncs it to disk, then
    renames it over the target, so a crash or kill mid-save leaves the previous file whole.
    (Lightning's own writer stages the file in the system temp dir; when that is another
    filesystem than the run dir, as on most clusters, the final move is a copy, not a rename.)
    Local paths only."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


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

    def _save_last(self, trainer: L.Trainer) -> None:
        if self._last_global_step_saved != trainer.global_step:  # not saved at this step yet
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def evaluation_due(step: int, every_n_steps: int, max_steps: int) -> bool:
    """The in-training evaluation schedule: every `every_n_steps` steps (0: never) and at the
    last step. best.ckpt (dtlab.checkpoint.BestCheckpoint) is saved on the same schedule."""
    return (every_n_steps > 0 and step % every_n_steps == 0) or step >= max_steps


def checkpoint_facts(path: str) -> tuple[int | None, list[int] | None, dict | None]:
    """A dtlab checkpoint's training step, the env seeds its in-training evaluations used, and
    how its run's final evaluation runs (episodes, seed, backend, workers, threads: what
    dtlab.evaluate repeats); None for what a checkpoint predates."""
    saved = torch.load(path, map_location="cpu", weights_only=False)
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
        if not Path(old).is_file():
            log.warning(
                "best.ckpt of the resumed run (%s) is not there: best.ckpt starts afresh in %s", old, self.dirpath
            )
            return
        new = Path(self.dirpath) / Path(old).name
        new.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(old, new)
        self.best_model_path = self.kth_best_model_path = str(new)
        self.best_model_score = self.kth_value = score
        self.best_k_models = {str(new): score}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        due = evaluation_due(trainer.global_step, self.every_n_steps, trainer.max_steps)
        if due and not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))


def load_checkpoint(path: str | Path) -> DTModule:
    """The DTModule in a checkpoint written by dtlab.train; DTLabError if it is missing or unreadable."""
    path = find_checkpoint(path)
    try:
        return DTModule.load_from_checkpoint(path, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - whatever torch or Lightning raise, the file is unusable
        reason = str(e).splitlines()[0][:200] if str(e) else ""
        raise DTLabError(
            f"checkpoint {str(path)!r} cannot be loaded ({type(e).__name__}: {reason}): "
            "is it a complete checkpoint written by dtlab.train?"
        ) from None


def resume_path(ckpt_path: str | None, module: DTModule) -> str | None:
    """The checkpoint to resume from (a file `dtlab.train.find_checkpoint` found), checked
    before any training step: it loads, and was trained with the same hyperparameters as
    `module` (the fresh module of this config), since Lightning would restore its weights and
    optimizer over any changed setting."""
    if ckpt_path is None:
        return None
    saved = load_checkpoint(ckpt_path).hparams
    # A key the checkpoint predates was at its constructor default when it was written.
    defaults = {k: p.default for k, p in inspect.signature(type(module).__init__).parameters.items()}
    changed = [
        f"{key}={saved.get(key, defaults.get(key))!r} there, {value!r} here"
        if isinstance(value, str | int | float | bool) or value is None
        else f"{key} differs"
        for key, value in module.hparams.items()
        if saved.get(key, defaults.get(key)) != value
    ]
    if changed:
        raise DTLabError(
            f"checkpoint {ckpt_path!r} was trained with other settings ({'; '.join(changed)}): "
            "resume with the config it was trained with, or start a new run without ckpt_path"
        )
    return ckpt_path
