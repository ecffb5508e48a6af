"""What the entry points share, free of Lightning (importing it takes seconds here, and bad
input must fail before that): where the configs are, the one-line error convention, the
checks of plugins, output dirs and checkpoint paths.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from dtlab import DTLabError


def _conf_dir() -> str:
    """conf/ as the wheel installs it (dtlab/conf), else the source checkout's top-level conf/
    (editable installs and a clone on PYTHONPATH)."""
    packaged = Path(__file__).resolve().parent / "conf"
    return str(packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "conf")


CONF_DIR = _conf_dir()


def find_checkpoint(ckpt_path: str | Path, checkpoints_dir: str | Path | None = None) -> str:
    """The checkpoint file `ckpt_path` names, or DTLabError if there is none. Free of
    Lightning, so that the entry points check the path before they import it.

    `ckpt_path=last` (with the `checkpoints_dir`, `paths.checkpoints_dir`, of a run to resume) is
    that run's `last.ckpt`: resume a run by pointing Hydra at its dir, `hydra.run.dir=OLD_RUN_DIR
    ckpt_path=last`, and the run goes on writing there."""
    if ckpt_path == "last" and checkpoints_dir is not None:
        last = Path(checkpoints_dir) / "last.ckpt"
        if not last.is_file():
            raise DTLabError(
                f"ckpt_path=last looks for {last}, which does not exist: resume a run with "
                "hydra.run.dir=OLD_RUN_DIR ckpt_path=last, or give ckpt_path=PATH"
            )
        return str(last)
    if not Path(ckpt_path).is_file():
        raise DTLabError(
            f"checkpoint {str(ckpt_path)!r} does not exist: give ckpt_path=PATH to a .ckpt written by dtlab.train"
        )
    return str(ckpt_path)


def run_cli(task, cfg: DictConfig):  # noqa: ANN001, ANN201 - a thin wrapper around any entry point
    """Run an entry point, turning DTLabError into one line on stderr and exit code 2 (the
    full traceback with HYDRA_FULL_ERROR=1)."""
    try:
        return task(cfg)
    except (DTLabError, InstantiationException) as e:
        # instantiate() wraps what a constructor raises (e.g. TrajectoryDataModule's K check)
        error = e if isinstance(e, DTLabError) else e.__cause__
        if not isinstance(error, DTLabError) or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        # on a line of its own: an error mid-run follows a progress bar's unfinished line
        print(f"\ndtlab: error: {error}", file=sys.stderr)
        sys.exit(2)


# Overrides that select a Hydra plugin, its module and its package (all in the [sweeps] extra)
PLUGINS = {
    "hydra/launcher=joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
    "hydra/launcher=submitit": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "hydra/launcher=slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "hydra/sweeper=optuna": ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper"),
    "hparams_search=optuna": ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper"),
}


def check_plugins(args: list[str]) -> None:
    """Name a missing plugin in one line; Hydra's own error is a page about its defaults list."""
    for arg in args:
        for override, (module, package) in PLUGINS.items():
            if arg.startswith(override) and importlib.util.find_spec(module) is None:
                raise DTLabError(f"{arg} needs {package}: pip install 'dtlab[sweeps]' (or pip install {package})")


def check_writable(dir_key: str, cfg: DictConfig) -> None:
    """Create the output dir `cfg.<dir_key>` and write a file into it, or raise DTLabError."""
    path = OmegaConf.select(cfg, dir_key)
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise DTLabError(
            f"output dir {path!r} cannot be written ({e.strerror}): choose another with {dir_key}=DIR"
        ) from None


# Every writer and reader of a run's checkpoints, each of which interpolates paths.checkpoints_dir
CHECKPOINT_DIR_KEYS = (
    "callbacks.checkpoint.dirpath",
    "callbacks.best_checkpoint.dirpath",
    "callbacks.evaluation.checkpoints_dir",
)


def check_checkpoints_dir(cfg: DictConfig) -> None:
    """One checkpoints dir: a writer overridden on its own (callbacks.checkpoint.dirpath=...)
    would leave the final evaluation and `ckpt_path=last` looking in the other one."""
    expected = str(Path(cfg.paths.checkpoints_dir))
    for key in CHECKPOINT_DIR_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and str(Path(value)) != expected:
            raise DTLabError(
                f"{key}={value} differs from paths.checkpoints_dir={expected}, which the final evaluation and "
                f"ckpt_path=last read: set paths.checkpoints_dir={value} instead (every checkpoint key follows it)"
            )
    check_writable("paths.checkpoints_dir", cfg)


def resume_checkpoint(ckpt_path: str | None, checkpoints_dir: str | Path) -> str | None:
    """The checkpoint a training run resumes from (None: it starts afresh), checked against what
    its checkpoints dir already holds. `ckpt_path=auto` is `last` when the dir has a last.ckpt and
    a fresh start when it has none: one command for a job that may be requeued.

    A run's final evaluation scores its own dir's last.ckpt and best.ckpt. Checkpoints there
    from an earlier run that is not the one resumed Lightning would leave in place, writing
    last-v1.ckpt or best-v1.ckpt beside them, and the final evaluation would score the old
    weights: refused, the old run kept. A DDP job's other ranks leave this to rank 0 (which
    has already copied the checkpoint it resumes into the dir when they look)."""
    from dtlab.lock import process_rank

    checkpoints = Path(checkpoints_dir)
    last = checkpoints / "last.ckpt"
    if ckpt_path == "auto":
        ckpt_path = "last" if last.is_file() else None
    resolved = None if ckpt_path is None else find_checkpoint(ckpt_path, checkpoints)
    held = sorted(p.name for p in checkpoints.glob("*.ckpt")) if checkpoints.is_dir() else []
    resumes_last = resolved is not None and Path(resolved).resolve() == last.resolve()
    if held and not resumes_last and process_rank() == 0:
        raise DTLabError(
            f"{checkpoints} already holds {', '.join(held)} from an earlier run: resume that run with ckpt_path=last "
            "(or ckpt_path=auto), or train into a new hydra.run.dir; to go on from another of its checkpoints, "
            "give ckpt_path=PATH with a new hydra.run.dir"
        )
    return resolved


def check_devices(trainer: DictConfig) -> None:
    """The GPUs a trainer config asks for against those this machine has, in one line (Lightning
    raises a traceback from inside instantiate)."""
    import torch

    accelerator, devices = trainer.get("accelerator"), trainer.get("devices")
    gpus = torch.cuda.device_count()
    asked = len(devices) if isinstance(devices, list | tuple) else devices if isinstance(devices, int) else None
    if accelerator in ("gpu", "cuda") and gpus == 0:
        raise DTLabError(
            f"trainer.accelerator={accelerator} but this machine has no CUDA device (torch {torch.__version__}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): use trainer=cpu"
        )
    if accelerator in ("gpu", "cuda", "auto") and gpus and asked is not None and asked > gpus:
        raise DTLabError(
            f"trainer.devices={devices} asks for {asked} GPUs (trainer.accelerator={accelerator}) but this machine has "
            f"{gpus}: set trainer.devices={gpus}, or trainer.accelerator=cpu for {asked} CPU processes"
        )


class CheckOutputDir(Callback):
    """A Hydra callback (conf: hydra.callbacks): Hydra creates the run dir before our code
    runs, and its own error when it cannot is a traceback; this says it in one line first."""

    def on_run_start(self, config: DictConfig, **kwargs: object) -> None:
        run_cli(lambda cfg: check_writable("hydra.run.dir", cfg), config)

    def on_multirun_start(self, config: DictConfig, **kwargs: object) -> None:
        run_cli(lambda cfg: check_writable("hydra.sweep.dir", cfg), config)


class LockRunDir(Callback):
    """A Hydra callback (conf/train.yaml): the run dir's lock (dtlab.lock), taken before Hydra
    writes the job's .hydra/ config and log into it, so that a second run in a dir in use
    overwrites nothing; `train()` takes it again, which also covers the compose API and
    multirun jobs (each job its own dir)."""

    def __init__(self) -> None:
        self.lock: Path | None = None

    def on_run_start(self, config: DictConfig, **kwargs: object) -> None:
        from dtlab import lock

        self.lock = run_cli(lambda cfg: lock.acquire(cfg.hydra.run.dir), config)

    def on_run_end(self, config: DictConfig, **kwargs: object) -> None:
        from dtlab import lock

        if self.lock is not None:
            lock.release(self.lock)
            self.lock = None
