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


def find_checkpoint(ckpt_path: str | Path, run_dir: str | Path | None = None) -> str:
    """The checkpoint file `ckpt_path` names, or DTLabError if there is none. Free of
    Lightning, so that the entry points check the path before they import it.

    `ckpt_path=last` (with the `run_dir` of a run to resume) is that run's `last.ckpt`: resume a
    run by pointing Hydra at its dir, `hydra.run.dir=OLD_RUN_DIR ckpt_path=last`, and the run
    goes on writing there."""
    if ckpt_path == "last" and run_dir is not None:
        last = Path(run_dir) / "checkpoints" / "last.ckpt"
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
        print(f"dtlab: error: {error}", file=sys.stderr)
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


class CheckOutputDir(Callback):
    """A Hydra callback (conf: hydra.callbacks): Hydra creates the run dir before our code
    runs, and its own error when it cannot is a traceback; this says it in one line first."""

    def on_run_start(self, config: DictConfig, **kwargs: object) -> None:
        run_cli(lambda cfg: check_writable("hydra.run.dir", cfg), config)

    def on_multirun_start(self, config: DictConfig, **kwargs: object) -> None:
        run_cli(lambda cfg: check_writable("hydra.sweep.dir", cfg), config)
