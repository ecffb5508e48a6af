"""Train a Decision Transformer: `python -m dtlab.train [overrides]` (conf/train.yaml)."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from dtlab import DTLabError
from dtlab.checkpoint import resume_path
from dtlab.rollout import check_env

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit a DTModule as `cfg` says; returns the final metrics (train/*, val/*, eval/*)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    action_bounds = check_env(cfg.env)

    # Load and check the data first: a bad dataset fails in seconds, before any model exists.
    datamodule = instantiate(cfg.data, action_bounds=action_bounds)
    datamodule.setup("fit")
    module = instantiate(
        cfg.model,
        _convert_="all",  # plain lists and dicts in the checkpoint's hyperparameters
        env_id=cfg.env.id,
        state_dim=cfg.env.obs_dim,
        act_dim=cfg.env.act_dim,
        max_ep_len=cfg.env.max_episode_steps,
        state_mean=datamodule.state_mean.tolist(),
        state_std=datamodule.state_std.tolist(),
        reward_scale=datamodule.reward_scale,
        seed=cfg.seed,
    )
    module.env_config = OmegaConf.to_container(cfg.env, resolve=True)
    module.episode_returns = datamodule.episode_returns.tolist()
    ckpt_path = resume_path(cfg.ckpt_path, cfg.paths.output_dir, module)
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values()]
    loggers = [instantiate(c) for c in (cfg.logger or {}).values()]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    # Lightning cannot see that our batch stream resumes exactly: it starts at the restored
    # trainer.global_step (data.py), so a checkpoint from mid-epoch is as good as any.
    warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before the epoch ended")
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        # Preemption: the checkpoint callback has saved last.ckpt. 143 = 128 + SIGTERM, the
        # status of a process ended by SIGTERM, so that `train && evaluate` does not go on.
        log.warning(
            "stopped by SIGTERM after step %d, saved in %s; continue with: python -m dtlab.train "
            "[same overrides] hydra.run.dir=%s ckpt_path=last",
            trainer.global_step,
            Path(cfg.paths.output_dir) / "checkpoints",
            cfg.paths.output_dir,
        )
        sys.exit(143)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("run dir: %s (checkpoints in %s)", cfg.paths.output_dir, Path(cfg.paths.output_dir) / "checkpoints")
    return metrics


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


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = run_cli(train, cfg)
    return metrics.get(cfg.get("optimized_metric", ""), None)


if __name__ == "__main__":
    main()
