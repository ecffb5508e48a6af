"""The evaluation protocol, apart from the env loop that carries it out (dtlab.rollout): which
target returns (`resolve_targets`), which env seeds (the selection, reporting, development
and exploration ranges, kept apart by `check_seed_ranges`), and the record stored beside
every score (`protocol`, `evaluation_record`) and the table every evaluation prints.
"""

from __future__ import annotations

import importlib.metadata
import math
import platform
from collections.abc import Mapping, Sequence

import gymnasium as gym
import mujoco
import numpy as np
import torch

from dtlab import DTLabError


def resolve_targets(
    target_return: Mapping, episode_returns: Sequence[float] | None = None, final: bool = False
) -> list[float]:
    """Raw target returns from a `target_return` config: its `values`, plus `quantiles` of the
    dataset's episode returns, plus `max_multiples` of their maximum; and, for the final
    evaluation (`final`), `final_sweep_points` targets evenly from the data's lowest episode
    return to `final_sweep_top` x its highest (target_return=sweep: return calibration)."""
    values = list(target_return.get("values") or [])
    quantiles = list(target_return.get("quantiles") or [])
    multiples = list(target_return.get("max_multiples") or [])
    sweep = int(target_return.get("final_sweep_points") or 0) if final else 0
    for v in (*values, *quantiles, *multiples):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise DTLabError(
                f"target return {v!r} is not a finite number: give numbers, e.g. target_return.values=[3000,6000]"
            )
    if (quantiles or multiples or sweep) and (episode_returns is None or len(episode_returns) == 0):
        raise DTLabError("targets relative to the data need its episode returns, and none are known")
    targets = [float(v) for v in values]
    if quantiles:
        targets += [float(q) for q in np.quantile(np.asarray(episode_returns), quantiles)]
    if multiples:
        targets += [float(m * np.max(episode_returns)) for m in multiples]
    if sweep:
        top = float(target_return.get("final_sweep_top") or 1.2) * float(np.max(episode_returns))
        targets += [float(round(t, 1)) for t in np.linspace(float(np.min(episode_returns)), top, sweep)]
    if not targets:
        raise DTLabError("no target returns given: set target_return.values=[...] or choose target_return=paper")
    return list(dict.fromkeys(targets))  # in order, each once


def asks_for_targets(target_return: Mapping | None) -> bool:
    """Whether a `target_return` config names any target for resolve_targets to resolve (none:
    dtlab.evaluate takes the checkpoint's run's own)."""
    keys = ("values", "quantiles", "max_multiples", "final_sweep_points")  # what resolve_targets reads
    return any((target_return or {}).get(k) for k in keys)


# Where recipe studies and benchmark scripts start their env seeds (eval.dev_seed=20000): far from
# the selection seeds (eval.seed, 0 on) and the reporting ones (eval.report_seed, 10000 on).
DEV_SEED = 20_000


def exploration_seeds(seed: int, run_seed: int, rounds: int, trajectories_per_round: int) -> range:
    """Online finetuning's env seeds (the episodes it trains on): a block of rounds x
    trajectories_per_round seeds per run seed, `seed` on, so that the seeds of a sweep explore
    from initial states of their own; round r takes the block's r-th trajectories_per_round."""
    n = rounds * trajectories_per_round
    return range(seed + run_seed * n, seed + (run_seed + 1) * n)


def overlapping(ranges: Mapping[str, tuple[str, range]]) -> tuple[str, str] | None:
    """The first two of `ranges` ({setting: (role, env seeds)}, in order) that share a seed, or None."""
    names = list(ranges)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            ra, rb = ranges[a][1], ranges[b][1]
            if ra and rb and ra.start < rb.stop and rb.start < ra.stop:
                return a, b
    return None


def check_seed_ranges(
    train_targets: int,
    seed: int,
    episodes: int,
    final_targets: int,
    report_seed: int,
    final_episodes: int,
    dev_seed: int | None = None,
    exploration: tuple[str, range] | None = None,
) -> None:
    """The seed ranges never share an env seed: selection (the in-training evaluations, which
    pick best.ckpt), reporting (the final evaluation's numbers), when `dev_seed` is set
    development (the final evaluation of a run that chooses something: a recipe study, a
    benchmark), and online finetuning's `exploration` (its setting, e.g. "online.seed=100000",
    and its seeds: exploration_seeds), which are training data. A number measured on
    episodes that chose something, or that were trained on, is no result. The final evaluation
    may have more targets (target_return=sweep)."""
    n_final = final_targets * final_episodes
    ranges = {} if exploration is None else {exploration[0]: ("exploration", exploration[1])}
    ranges[f"eval.seed={seed}"] = ("in-training", range(seed, seed + train_targets * episodes))
    ranges[f"eval.report_seed={report_seed}"] = ("reporting", range(report_seed, report_seed + n_final))
    if dev_seed is not None:
        ranges[f"eval.dev_seed={dev_seed}"] = ("development", range(dev_seed, dev_seed + n_final))
    pair = overlapping(ranges)
    if pair:
        (role_a, ra), (role_b, rb) = ranges[pair[0]], ranges[pair[1]]
        raise DTLabError(
            f"{pair[0]} gives {role_a} env seeds {ra.start}-{ra.stop - 1}, which overlap the {role_b} seeds "
            f"{rb.start}-{rb.stop - 1} ({pair[1]}): keep the ranges apart (eval.dev_seed={DEV_SEED} is the "
            "development range's usual start)"
        )


def final_seeds(report_seed: int, dev_seed: int | None) -> tuple[int, str]:
    """The final evaluation's first env seed and the role recorded with it: the reporting
    seeds, or the development ones when a run that chooses something sets eval.dev_seed."""
    return (report_seed, "reporting") if dev_seed is None else (dev_seed, "development")


def protocol(
    env: Mapping,
    targets: Sequence[float],
    target_return: Mapping,
    episodes: int,
    seed: int,
    checkpoint: str | None,
    step: int | None,
    seeds_role: str,
    *,
    ran: Mapping,
) -> dict:
    """What a score was measured under, stored beside it: env and library versions, the env
    seeds, episodes per target, the targets and the rule that chose them, the checkpoint and
    its training step, and how the rollout ran (`ran`: rollout's result["ran"], from
    `execution`: backend, workers, threads; onnxruntime's version among the versions).
    `seeds_role`: "reporting" (never used to pick anything), "selection" (the in-training
    seeds that pick best.ckpt and feed sweepers) or "development" (a run that chose a recipe
    or a budget: never a result)."""
    n = len(targets) * episodes
    onnxruntime = {"onnxruntime": ran["onnxruntime"]} if ran.get("onnxruntime") else {}
    return {
        "env_id": env["id"],
        "max_episode_steps": int(env["max_episode_steps"]),
        "seeds": [seed, seed + n - 1],
        "seeds_role": seeds_role,
        "episodes_per_target": episodes,
        "targets": [float(t) for t in targets],
        "target_rule": {
            **{k: list(target_return.get(k) or []) for k in ("values", "quantiles", "max_multiples")},
            "final_sweep_points": int(target_return.get("final_sweep_points") or 0),
        },
        "checkpoint": checkpoint,
        "step": step,
        "backend": ran["backend"],
        "workers": ran["workers"],
        "threads": ran["threads"],
        "versions": {
            "dtlab": version("dtlab"),
            "gymnasium": gym.__version__,
            "mujoco": mujoco.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            **onnxruntime,
        },
    }


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def evaluation_record(protocol: dict, result: dict) -> dict:
    """One evaluation as evaluation.json and each checkpoint of final_evaluation.json hold it:
    its protocol, every episode, a summary per target."""
    return {"protocol": protocol, "episodes": result["episodes"], "summary": result["summary"]}


def format_summary(summary: Sequence[Mapping], checkpoint: str = "") -> str:
    """The table every evaluation prints: one row per target (never a max over them)."""
    # 15 wide: "pretrained@5000", an online run's end of pretraining
    lines = [f"{'checkpoint':>15}  {'target':>10}  {'return (mean +- std)':>22}  {'normalized':>10}  {'episodes':>8}"]
    for s in summary:
        ret = f"{s['return_mean']:.1f} +- {s['return_std']:.1f}"
        lines.append(
            f"{checkpoint:>15}  {s['target']:>10g}  {ret:>22}  {s['normalized_score']:>10.1f}  {s['episodes']:>8}"
        )
    return "\n".join(lines)
