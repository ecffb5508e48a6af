"""Train a Decision Transformer: `python -m dtlab.train [overrides]` (conf/train.yaml)."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dtlab import DTLabError
from dtlab.data import format_report, minari_env
from dtlab.rollout import check_env
from dtlab.tracking import WandbLogger

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
log = logging.getLogger(__name__)
# env=from_dataset reads the env config out of a Minari dataset
OmegaConf.register_new_resolver("minari_env", minari_env, replace=True)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit a DTModule as `cfg` says; returns the final metrics (train/*, val/*, eval/*)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    check_env(cfg.env)

    # Load and check the data first: a bad dataset fails in seconds, before any model exists.
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    log.info("dataset:\n%s", format_report(datamodule.report))
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
    )
    module.env_config = OmegaConf.to_container(cfg.env, resolve=True)
    module.episode_returns = datamodule.episode_returns.tolist()
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values()]
    loggers = [instantiate(c) for c in (cfg.logger or {}).values()]
    # The composed config, resolved, is the run's config (W&B starts here, before any training).
    run_config = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    failed = True
    try:
        report = datamodule.report
        for logger in loggers:
            logger.log_hyperparams(run_config)
            if hasattr(logger, "log_table"):  # W&B: the dataset report as a table
                logger.log_table("dataset/report", columns=list(report[0]), data=[list(r.values()) for r in report])
        trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        failed = False
    finally:
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                logger.finish(failed)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("run dir: %s (checkpoints in %s)", cfg.paths.output_dir, Path(cfg.paths.output_dir) / "checkpoints")
    return metrics


def run_cli(task, cfg: DictConfig):  # noqa: ANN001, ANN201 - a thin wrapper around any entry point
    """Run an entry point, turning DTLabError into one line on stderr and exit code 2 (the
    full traceback with HYDRA_FULL_ERROR=1)."""
    import os

    try:
        return task(cfg)
    except DTLabError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"dtlab: error: {e}", file=sys.stderr)
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
