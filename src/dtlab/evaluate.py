"""Evaluate a checkpoint in its env: `python -m dtlab.evaluate ckpt_path=PATH [overrides]`, or a
transformers DecisionTransformerModel folder: `python -m dtlab.evaluate hf_model=PATH env=ENV`.

Prints a table, and writes `evaluation.json` (its protocol record: env, seeds, episodes,
targets, checkpoint and step, the backend, workers and threads that ran, versions; every
episode; a summary per target) and the return-conditioning plot into the run dir. By default a
checkpoint's evaluation repeats its run's final evaluation: its targets, episodes, reporting
seeds (which no in-training evaluation uses), backend, workers and threads. With
`eval.dev_seed=20000`, on the development seeds, for benchmarks and recipe studies (recorded
as such, never a result).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from dtlab import DTLabError
from dtlab.cli import CONF_DIR, find_checkpoint, run_cli
from dtlab.config import Eval, EvaluateConfig, EvaluateTargets, check_config
from dtlab.data import episodes_from_dataset
from dtlab.hf import from_transformers
from dtlab.policy import Policy
from dtlab.protocol import (
    asks_for_targets,
    check_seed_ranges,
    evaluation_record,
    final_seeds,
    format_summary,
    overlapping,
    protocol,
    resolve_targets,
)
from dtlab.rollout import NonFiniteRollout, check_env, rollout

log = logging.getLogger(__name__)


def load_policy(cfg: DictConfig) -> tuple[Policy, dict]:
    """The policy to evaluate, with what its source says of its training: {"env_id", "env" (that
    env's config), "episode_returns" (the training data's), "target_return" (the run's target
    config), "step", "selection_seeds" (its in-training evaluations'), "final_evaluation" (how
    its run's final evaluation ran)}, each None where the source says nothing."""
    if (cfg.ckpt_path is None) == (cfg.hf_model is None):
        raise DTLabError(
            "give one of ckpt_path=PATH (a dtlab checkpoint) or hf_model=PATH (a transformers save_pretrained folder)"
        )
    if cfg.hf_model is not None:
        imported = from_transformers(cfg.hf_model)
        returns = None
        if imported.state_mean is None and cfg.get("dataset") is not None:
            # no dtlab.json (a hub checkpoint): normalize as the HF tutorial did, with the state
            # mean and std over every step of the data it was trained on (std + 1e-6)
            episodes = episodes_from_dataset(instantiate(cfg.dataset)())
            imported.state_mean = episodes.observations.mean(axis=0).tolist()
            imported.state_std = (episodes.observations.std(axis=0) + 1e-6).tolist()
            imported.reward_scale = float(cfg.hf_reward_scale)
            returns = episodes.returns.tolist()
        trained = {"env_id": imported.env_id, "env": None, "episode_returns": returns, "target_return": None}
        trained |= {"step": None, "selection_seeds": None, "final_evaluation": None}
        return imported.policy(repr(cfg.hf_model)), trained
    find_checkpoint(cfg.ckpt_path)  # before Lightning is imported (~9 s), so that a wrong path fails at once
    from dtlab.checkpoint import checkpoint_facts, module_from_checkpoint, read_checkpoint

    saved = read_checkpoint(cfg.ckpt_path)  # the file's one read
    module = module_from_checkpoint(saved)
    step, selection, final = checkpoint_facts(saved)
    trained = {
        "env_id": module.hparams.env_id,
        "env": module.env_config,
        "episode_returns": module.episode_returns,
        "target_return": module.target_return,
        "step": step,
        "selection_seeds": selection,
        "final_evaluation": final,
    }
    return Policy.from_module(module), trained


def choose_targets(cfg: DictConfig, trained: dict, source: str) -> None:
    """No targets given (target_return=run, the default): the targets the checkpoint's run
    evaluated at, so that evaluating last.ckpt repeats its final evaluation; the env's paper
    targets for a source that does not record them (an hf_model, a checkpoint written before
    dtlab recorded them)."""
    if asks_for_targets(cfg.get("target_return")):
        return
    with open_dict(cfg):
        if trained["target_return"] is not None:
            cfg.target_return = trained["target_return"]
            log.info("targets: those %s's run evaluated at (choose others with target_return=...)", source)
        else:
            cfg.target_return = {"values": list(cfg.env.get("target_returns") or [])}
            log.info(
                "%s does not record the targets its run evaluated at: the env's paper targets %s "
                "(choose others with target_return=...)",
                source,
                list(cfg.target_return["values"]),
            )


REPEATED = ("episodes", "seed", "backend", "workers")  # eval keys that default to the run's final evaluation's


def choose_protocol(cfg: DictConfig, final: dict | None, source: str) -> None:
    """Eval keys left at null (conf/evaluate.yaml's default): those of the checkpoint's run's
    final evaluation (`final`, kept in the checkpoint: episodes, seed, the backend and workers it
    resolved to, torch's threads), so that evaluating last.ckpt repeats it episode for episode;
    for a source that does not record them (an hf_model, a checkpoint written before it recorded them):
    eval.final_episodes, eval.report_seed and the backend and workers defaults. `threads=null`
    takes the run's threads too."""
    fallback = {
        "episodes": cfg.eval.final_episodes,
        "seed": cfg.eval.report_seed,
        "backend": Eval.model_fields["backend"].default,
        "workers": Eval.model_fields["workers"].default,
    }
    repeated = [k for k in REPEATED if cfg.eval.get(k) is None]
    with open_dict(cfg):
        for key in repeated:
            cfg.eval[key] = (final or fallback).get(key, fallback[key])
    if cfg.threads is None and final and final.get("threads"):
        torch.set_num_threads(final["threads"])
    if repeated:
        log.info(
            "eval.%s: %s, as %s (choose others with eval.<key>=...)",
            ", eval.".join(repeated),
            ", ".join(str(cfg.eval[k]) for k in repeated),
            "the run's final evaluation ran" if final else f"{source} does not record its run's final evaluation",
        )


def evaluate(cfg: DictConfig) -> dict:
    """Roll out the checkpoint for every target return; returns the report it writes."""
    check_config(cfg, EvaluateConfig)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    policy, trained = load_policy(cfg)
    trained_env_id, episode_returns = trained["env_id"], trained["episode_returns"]
    source_key = "ckpt_path" if cfg.ckpt_path is not None else "hf_model"
    source = cfg[source_key]
    with open_dict(cfg):
        if cfg.get("env") is None:
            if not trained["env"]:
                raise DTLabError(f"{source!r} does not say its env config: choose one with env=...")
            cfg.env = trained["env"]
    if trained_env_id is not None and cfg.env.id != trained_env_id:
        raise DTLabError(
            f"{source_key} was trained in {trained_env_id} but env={cfg.env.id} was asked: "
            "evaluate it in the env it was trained in (drop the env override)"
        )
    model_dims = (policy.model.config.state_dim, policy.model.config.act_dim)
    if model_dims != (cfg.env.obs_dim, cfg.env.act_dim):
        raise DTLabError(
            f"the model takes observations of size {model_dims[0]} and actions of size {model_dims[1]}, "
            f"but {cfg.env.id} has {cfg.env.obs_dim} and {cfg.env.act_dim}: choose the env it was trained in"
        )
    check_env(cfg.env)
    choose_targets(cfg, trained, source)
    check_config(cfg, EvaluateTargets)
    from dtlab.callbacks import plot_return_conditioning, write_video  # Lightning: after the checks

    targets = resolve_targets(cfg.target_return, episode_returns, final=True)  # a reporting evaluation
    out = Path(cfg.paths.output_dir)
    step, selection, final = trained["step"], trained["selection_seeds"], trained["final_evaluation"]
    choose_protocol(cfg, final, source)
    n = len(targets) * cfg.eval.episodes
    seed, role = cfg.eval.seed, "reporting"
    if final and final.get("seeds_role") == "development" and seed == final["seed"]:
        role = "development"  # repeating a recipe study's final evaluation: still no result
    if cfg.eval.get("dev_seed") is not None:  # a benchmark's or a recipe study's evaluation
        check_seed_ranges(0, 0, 0, len(targets), cfg.eval.report_seed, cfg.eval.episodes, cfg.eval.dev_seed)
        seed, role = final_seeds(cfg.eval.report_seed, cfg.eval.dev_seed)
    asked = {"this evaluation": ("", range(seed, seed + n))}
    if selection and overlapping(asked | {"selection": ("", range(selection[0], selection[1] + 1))}):
        role = "overlaps selection"
        log.warning(
            "env seeds %d-%d overlap the seeds %d-%d that picked this run's best.ckpt during training: scores on "
            "them are not free of selection (drop eval.seed to use the reporting seeds)",
            seed,
            seed + n - 1,
            *selection,
        )
    try:
        result = rollout(
            policy,
            cfg.env,
            targets,
            cfg.eval.episodes,
            seed=seed,
            vector_mode=cfg.eval.vector_mode,
            video_frames=cfg.eval.video_frames if cfg.eval.video else 0,
            backend=cfg.eval.backend,
            workers=cfg.eval.workers,
        )
    except NonFiniteRollout as e:
        raise DTLabError(f"{source_key}={source}: {e}") from None
    record = protocol(
        cfg.env,
        targets,
        cfg.target_return,
        cfg.eval.episodes,
        seed,
        str(Path(source).resolve()),
        step,
        role,
        ran=result["ran"],
    )
    report = {source_key: str(Path(source).resolve()), "env_id": cfg.env.id, **evaluation_record(record, result)}
    (out / "evaluation.json").write_text(json.dumps(report, indent=2))
    plot_return_conditioning(result["episodes"], episode_returns, out / "return_conditioning.png", cfg.env.id)
    for target, frames in zip(targets, result.get("frames", []), strict=False):
        write_video(frames, out / f"video_target{target:g}.mp4")

    label = Path(source).name if step is None else f"{Path(source).name}@{step}"
    print(f"{source_key}={source}, env seeds {record['seeds'][0]}-{record['seeds'][1]} ({role}):")
    print(format_summary(result["summary"], label))
    print(f"wrote {out / 'evaluation.json'} and {out / 'return_conditioning.png'}")
    return report


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_cli(evaluate, cfg)


if __name__ == "__main__":
    main()
