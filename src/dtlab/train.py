"""Train a Decision Transformer: `python -m dtlab.train [overrides]` (conf/train.yaml)."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dtlab import DTLabError
from dtlab.data import format_report, minari_env
from dtlab.rollout import check_env

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
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("run dir: %s (checkpoints in %s)", cfg.paths.output_dir, Path(cfg.paths.output_dir) / "checkpoints")
    return metrics


def run_cli(task, cfg: DictConfig):  # noqa: ANN001, ANN201 - a thin wrapper around any entry point
    """Run an entry point, turning DTLabError into one line on stderr and exit code 2 (the
    full traceback with HYDRA_FULL_ERROR=1)."""
    import os
    import sys

    try:
        return task(cfg)
    except DTLabError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"dtlab: error: {e}", file=sys.stderr)
        sys.exit(2)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = run_cli(train, cfg)
    return metrics.get(cfg.get("optimized_metric", ""), None)


if __name__ == "__main__":
    main()
