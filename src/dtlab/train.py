"""Train a Decision Transformer: `python -m dtlab.train [overrides]` (conf/train.yaml)."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from dtlab import lock
from dtlab.cli import (  # noqa: F401 - CheckOutputDir: 0.1 configs name it here
    CONF_DIR,
    CheckOutputDir,
    check_checkpoints_dir,
    check_devices,
    check_plugins,
    resume_checkpoint,
    run_cli,
)
from dtlab.config import TrainConfig, check_config, check_retired
from dtlab.data import check_context_length, check_episode_lengths, format_report, load_episodes, minari_env
from dtlab.policy import check_timesteps
from dtlab.protocol import check_seed_ranges, exploration_seeds, format_summary, resolve_targets
from dtlab.rollout import check_env

log = logging.getLogger(__name__)
# env=from_dataset reads the env config out of a Minari dataset
OmegaConf.register_new_resolver("minari_env", minari_env, replace=True)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit a PolicyModule as `cfg` says; returns the final metrics (train/*, val/*, eval/*). The
    run dir is locked meanwhile (dtlab.lock): a second run there refuses to start."""
    check_config(cfg, TrainConfig)
    held = lock.acquire(cfg.paths.output_dir)
    try:
        return _train(cfg)
    finally:
        lock.release(held)


def _train(cfg: DictConfig) -> dict[str, float]:
    if cfg.get("online") is not None:
        online_stage(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # Check the env and the data first: bad input fails in seconds, before any model exists
    # and before Lightning is imported, which alone takes ~9 s here (torchmetrics, torch._dynamo).
    action_bounds = check_env(cfg.env)
    check_context_length(cfg.data.context_length, cfg.data.max_ep_len)
    episodes = load_episodes(instantiate(cfg.dataset), cfg.env.obs_dim, cfg.env.act_dim, action_bounds)
    check_episode_lengths(episodes, cfg.data.max_ep_len)
    horizon = cfg.env.max_episode_steps
    # the table's rows, None for a model without one (PolicyModule's defaults: dt, with a table)
    table = cfg.model.get("timestep_embedding", True) and cfg.model.get("policy", "dt") == "dt"
    rows = cfg.data.max_ep_len if table else None
    check_timesteps(horizon - 1, rows, f"env.max_episode_steps={horizon}", "shorten the evaluations")
    warn_if_d4rl_in_v5(cfg.dataset.get("_target_"), cfg.env.id)
    targets = resolve_targets(cfg.target_return, episodes.returns)
    final_targets = resolve_targets(cfg.target_return, episodes.returns, final=True)
    e, o = cfg.eval, cfg.get("online")
    explore = None
    if o is not None and o.collect:
        run_seed = cfg.seed if o.per_run_seeds else 0
        setting = f"online.seed={o.seed}" + (f" at seed={run_seed}" if run_seed else "")
        explore = (setting, exploration_seeds(o.seed, run_seed, o.rounds, o.trajectories_per_round))
    check_seed_ranges(
        len(targets),
        e.seed,
        e.episodes,
        len(final_targets),
        e.report_seed,
        e.final_episodes,
        e.get("dev_seed"),
        explore,
    )
    check_checkpoints_dir(cfg)
    check_devices(cfg.trainer)
    ckpt_path = resume_checkpoint(cfg.ckpt_path, cfg.paths.checkpoints_dir)

    import lightning as L
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from dtlab.checkpoint import Checkpoint, resume_path
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
    module.target_return = OmegaConf.to_container(cfg.target_return, resolve=True)
    # The composed config, resolved, is the run's config (W&B starts here, before any training);
    # it travels in every checkpoint, which a resume is checked against.
    run_config = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    module.run_config = run_config
    ckpt_path = resume_path(ckpt_path, module, run_config)
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values()]
    # last.ckpt after best.ckpt at a step that saves both (Lightning keeps the checkpoint
    # callbacks' order), so that last.ckpt holds the best so far with that step's: resumed
    # from it, a run knows the best.ckpt on disk and does not write best-v1.ckpt beside it.
    callbacks.sort(key=lambda callback: isinstance(callback, Checkpoint))
    for callback in callbacks:
        if ckpt_path is not None and isinstance(callback, Checkpoint):
            callback.adopt(ckpt_path)
    if cfg.get("online") is not None:  # after the evaluation callback: a round follows its step's evaluation
        env, target_return = (OmegaConf.to_container(cfg[k], resolve=True) for k in ("env", "target_return"))
        callbacks.append(
            instantiate(
                cfg.online,
                env=env,
                target_return=target_return,
                vector_mode=cfg.eval.vector_mode,
                checkpoints_dir=cfg.paths.checkpoints_dir,  # pretrained.ckpt beside the run's other checkpoints
            )
        )
    loggers = [instantiate(c) for c in (cfg.logger or {}).values()]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    # Lightning cannot see that our batch stream resumes exactly: it starts at the restored
    # trainer.global_step (data.py), so a checkpoint from mid-epoch is as good as any.
    warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before the epoch ended")
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
            cfg.paths.checkpoints_dir,
            cfg.paths.output_dir,
        )
        sys.exit(143)
    finally:
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                logger.finish(failed)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    run_dir = Path(cfg.paths.output_dir)
    final = run_dir / "final_evaluation.json"
    if final.is_file():  # written by the evaluation callback (on rank 0 under DDP)
        report = json.loads(final.read_text())
        # with the run's resolved config, the file is the run's whole record (dtlab.report)
        final.write_text(json.dumps(report | {"config": run_config}, indent=2))
        print_final_evaluation(report)
    log.info("run dir: %s (checkpoints in %s, final evaluation in %s)", run_dir, cfg.paths.checkpoints_dir, final.name)
    return metrics


def online_stage(cfg: DictConfig) -> None:
    """algo=odt: the fit is `online.pretrain_steps` offline steps, then `online.rounds` rounds
    of `online.updates_per_round` steps. Sets trainer.max_steps to that total (a typed
    trainer.max_steps is refused: dtlab.config.check_keys_act), so that the LR schedule, the
    evaluations' last step, the checkpoints and the run's record all count every step.
    online.pretrain_steps is fixed first: its default (conf/algo/odt.yaml) is the composed
    trainer.max_steps, a preset's offline step budget."""
    o = cfg.online
    pretrain = int(o.pretrain_steps)
    with open_dict(cfg):
        o.pretrain_steps = pretrain
        cfg.trainer.max_steps = pretrain + int(o.rounds) * int(o.updates_per_round)
    log.info(
        "online finetuning: %d offline steps, then %d rounds of %d trajectories and %d steps: %d steps in all",
        pretrain,
        o.rounds,
        o.trajectories_per_round,
        o.updates_per_round,
        cfg.trainer.max_steps,
    )


# D4RL's v2 data was collected in the v3 MuJoCo envs; gymnasium's v4 keeps their models and
# rewards on the mujoco bindings, v5 changed these (gymnasium's v5 release notes).
D4RL_LOADERS = ("dtlab.data.load_hub", "dtlab.data.load_hdf5")
V5_DIFFERS = {
    "HalfCheetah": "HalfCheetah-v5's dynamics and reward are v3's, so scores compare",
    "Hopper": "Hopper-v5 no longer pays the healthy reward on the final, unhealthy step",
    "Walker2d": "Walker2d-v5 changed one foot's friction, so the dynamics differ",
}


def warn_if_d4rl_in_v5(loader: str | None, env_id: str) -> None:
    """One warning when D4RL data (collected in v3) is scored in a v5 env, saying what differs."""
    name, _, version = env_id.rpartition("-")
    if loader in D4RL_LOADERS and version == "v5":
        log.warning(
            "D4RL data (collected in %s-v3) is scored in %s: %s; env=%s-v4 is the env it comes from",
            name,
            env_id,
            V5_DIFFERS.get(name, "the env differs from v3"),
            name.lower(),
        )


def print_final_evaluation(report: dict) -> None:
    checkpoints = report["checkpoints"]
    if not checkpoints:
        return
    record = next(iter(checkpoints.values()))["protocol"]
    role = {
        "reporting": "reporting: no in-training evaluation used them",
        "development": "development: for choosing a recipe, never for reporting",
    }.get(record.get("seeds_role"), record.get("seeds_role", "reporting"))
    print(
        f"final evaluation: env seeds {record['seeds'][0]}-{record['seeds'][1]} ({role}), "
        f"{record['episodes_per_target']} episodes per target"
    )
    tables = [format_summary(c["summary"], f"{name}@{c['protocol']['step']}") for name, c in checkpoints.items()]
    print("\n".join([tables[0], *(t.split("\n", 1)[1] for t in tables[1:])]))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    """Returns the metric named by `optimized_metric`, for sweepers (Optuna) to optimise."""
    metrics = run_cli(train, cfg)
    return metrics.get(cfg.get("optimized_metric") or "", None)


def main() -> None:
    run_cli(check_plugins, sys.argv[1:])
    run_cli(check_retired, sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
