"""Evaluate a checkpoint in its env: `python -m dtlab.evaluate ckpt_path=PATH [overrides]`, or a
transformers DecisionTransformerModel folder: `python -m dtlab.evaluate hf_model=PATH env=ENV`.

Prints a table, and writes `evaluation.json` (every episode, a summary per target, the
checkpoint, env and library versions) and the return-conditioning plot into the run dir.
"""

from __future__ import annotations

import json
import logging
import platform
from pathlib import Path

import gymnasium
import hydra
import mujoco
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from dtlab import DTLabError
from dtlab.hf import from_transformers
from dtlab.policy import Policy
from dtlab.rollout import check_env, resolve_targets, rollout
from dtlab.train import CONF_DIR, find_checkpoint, run_cli

log = logging.getLogger(__name__)


def load_policy(cfg: DictConfig) -> tuple[Policy, str | None, dict | None, list[float] | None]:
    """The policy to evaluate, with what its source says of its training (None where it says
    nothing): the env id, that env's config, the training data's episode returns."""
    if (cfg.ckpt_path is None) == (cfg.hf_model is None):
        raise DTLabError(
            "give one of ckpt_path=PATH (a dtlab checkpoint) or hf_model=PATH (a transformers save_pretrained folder)"
        )
    if cfg.hf_model is not None:
        imported = from_transformers(cfg.hf_model)
        return imported.policy(repr(cfg.hf_model)), imported.env_id, None, None
    find_checkpoint(cfg.ckpt_path)  # before Lightning is imported (~9 s), so that a wrong path fails at once
    from dtlab.checkpoint import load_checkpoint

    module = load_checkpoint(cfg.ckpt_path)
    return Policy.from_module(module), module.hparams.env_id, module.env_config, module.episode_returns


def evaluate(cfg: DictConfig) -> dict:
    """Roll out the checkpoint for every target return; returns the report it writes."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    policy, trained_env_id, trained_in, episode_returns = load_policy(cfg)
    source_key = "ckpt_path" if cfg.ckpt_path is not None else "hf_model"
    source = cfg[source_key]
    with open_dict(cfg):
        if cfg.get("env") is None:
            if not trained_in:
                raise DTLabError(f"{source!r} does not say its env config: choose one with env=...")
            cfg.env = trained_in
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
    from dtlab.callbacks import plot_return_conditioning, write_video  # Lightning: after the checks

    targets = resolve_targets(cfg.target_return, episode_returns)
    out = Path(cfg.paths.output_dir)
    result = rollout(
        policy,
        cfg.env,
        targets,
        cfg.eval.episodes,
        seed=cfg.eval.seed,
        vector_mode=cfg.eval.vector_mode,
        video_frames=cfg.eval.video_frames if cfg.eval.video else 0,
    )
    report = {
        source_key: str(Path(source).resolve()),
        "env_id": cfg.env.id,
        "episodes": result["episodes"],
        "summary": result["summary"],
        "eval": OmegaConf.to_container(cfg.eval, resolve=True),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "gymnasium": gymnasium.__version__,
            "mujoco": mujoco.__version__,
        },
    }
    (out / "evaluation.json").write_text(json.dumps(report, indent=2))
    plot_return_conditioning(result["episodes"], episode_returns, out / "return_conditioning.png", cfg.env.id)
    for target, frames in zip(targets, result.get("frames", []), strict=False):
        write_video(frames, out / f"video_target{target:g}.mp4")

    lines = [f"{'target':>10}  {'return (mean +- std)':>22}  {'normalized':>10}  {'episodes':>8}"]
    for s in result["summary"]:
        ret = f"{s['return_mean']:.1f} +- {s['return_std']:.1f}"
        lines.append(f"{s['target']:>10g}  {ret:>22}  {s['normalized_score']:>10.1f}  {s['episodes']:>8}")
    print("\n".join(lines))
    print(f"wrote {out / 'evaluation.json'} and {out / 'return_conditioning.png'}")
    return report


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_cli(evaluate, cfg)


if __name__ == "__main__":
    main()
