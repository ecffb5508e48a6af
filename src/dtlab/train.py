"""Train a Decision Transformer: `python -m dtlab.train [overrides]` (conf/train.yaml)."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import hydra
import torch
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dtlab import DTLabError
from dtlab.data import check_context_length, check_episode_lengths, format_report, load_episodes, minari_env
from dtlab.policy import check_timesteps
from dtlab.rollout import check_env

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
log = logging.getLogger(__name__)
# env=from_dataset reads the env config out of a Minari dataset
OmegaConf.register_new_resolver("minari_env", minari_env, replace=True)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit a DTModule as `cfg` says; returns the final metrics (train/*, val/*, eval/*)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # Check the env and the data first: bad input fails in seconds, before any model exists
    # and before Lightning is imported, which alone takes ~9 s here (torchmetrics, torch._dynamo).
    action_bounds = check_env(cfg.env)
    check_context_length(cfg.data.context_length, cfg.data.max_ep_len)
    episodes = load_episodes(instantiate(cfg.dataset), cfg.env.obs_dim, cfg.env.act_dim, action_bounds)
    check_episode_lengths(episodes, cfg.data.max_ep_len)
    horizon = cfg.env.max_episode_steps
    check_timesteps(horizon - 1, cfg.data.max_ep_len, f"env.max_episode_steps={horizon}", "shorten the evaluations")
    ckpt_path = None if cfg.ckpt_path is None else find_checkpoint(cfg.ckpt_path, cfg.paths.output_dir)

    import lightning as L
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from dtlab.checkpoint import resume_path
    from dtlab.tracking import WandbLogger

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    # partial, then called: instantiate() would take the Episodes dataclass for a config
    datamodule = instantiate(cfg.data, _partial_=True)(episodes=episodes)
    datamodule.setup("fit")
    log.info("dataset:\n%s", format_report(datamodule.report))
    module = instantiate(
        cfg.model,
        _convert_="all",  # plain lists and dicts in the checkpoint's hyperparameters
        env_id=cfg.env.id,
        state_dim=cfg.env.obs_dim,
        act_dim=cfg.env.act_dim,
        max_ep_len=cfg.data.max_ep_len,  # the env's real episode limit, not the evaluation horizon
        state_mean=datamodule.state_mean.tolist(),
        state_std=datamodule.state_std.tolist(),
        reward_scale=datamodule.reward_scale,
        seed=cfg.seed,
    )
    module.env_config = OmegaConf.to_container(cfg.env, resolve=True)
    module.episode_returns = datamodule.episode_returns.tolist()
    ckpt_path = resume_path(ckpt_path, module)
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values()]
    loggers = [instantiate(c) for c in (cfg.logger or {}).values()]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    # Lightning cannot see that our batch stream resumes exactly: it starts at the restored
    # trainer.global_step (data.py), so a checkpoint from mid-epoch is as good as any.
    warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before the epoch ended")
    # The composed config, resolved, is the run's config (W&B starts here, before any training).
    run_config = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    failed = True
    try:
        report = datamodule.report
        for logger in loggers:
            logger.log_hyperparams(run_config)
            if hasattr(logger, "log_table"):  # W&B: the dataset report as a table
                logger.log_table("dataset/report", columns=list(report[0]), data=[list(r.values()) for r in report])
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        failed = False
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
    finally:
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                logger.finish(failed)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("run dir: %s (checkpoints in %s)", cfg.paths.output_dir, Path(cfg.paths.output_dir) / "checkpoints")
    return metrics


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


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    """Returns the metric named by `optimized_metric`, for sweepers (Optuna) to optimise."""
    metrics = run_cli(train, cfg)
    return metrics.get(cfg.get("optimized_metric") or "", None)


def main() -> None:
    run_cli(check_plugins, sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
