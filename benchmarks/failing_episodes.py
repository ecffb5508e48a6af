"""How a HalfCheetah DT's episodes fail at a high target: rolls a checkpoint out with its
trajectories recorded and says, for each episode, when the cheetah got going, whether and when
it flipped onto its back, and how fast it ran at the end.

    PYTHONPATH=src python benchmarks/failing_episodes.py CKPT --target 11476 --episodes 20 \
        --seed 20020 --backend eager onnxruntime

The first run's last failures are the odd episode out of twenty that goes nowhere at the
expert's return (docs/notes.md#return-conditioning). An episode that never gets going is a
failure at the start, from rest; one that flips at speed is a failure of the expert's gait.
The cure differs, so this tells them apart. Use development seeds (20000 on), never the
reporting ones. Writes results/failing_episodes.json (or --out).
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from dtlab.module import PolicyModule
from dtlab.policy import Policy
from dtlab.rollout import DEV_SEED, rollout

ROOT = Path(__file__).resolve().parents[1]
PITCH, X_VELOCITY = 1, 8  # HalfCheetah-v5 observation: qpos[1:] (rootz, rooty, ...) then qvel
FLIPPED = 1.5  # rad of pitch: on its back


def describe(observations: np.ndarray, received: float, threshold: float) -> dict:
    """One episode's story from its observations (T, 17)."""
    pitch, speed = observations[:, PITCH], observations[:, X_VELOCITY]
    flipped = np.abs(pitch) > FLIPPED
    flip_step = int(np.argmax(flipped)) if flipped.any() else None
    if received >= threshold:
        kind = "ran"
    elif flip_step is None:
        kind = "never got going" if speed[:50].mean() < 1.0 else "slowed"
    else:
        kind = "flipped"
    return {
        "return": round(received, 1),
        "kind": kind,
        "flip_step": flip_step,
        "speed_first_50": round(float(speed[:50].mean()), 2),
        "speed_last_100": round(float(speed[-100:].mean()), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt")
    parser.add_argument("--target", type=float, default=11476.0)
    parser.add_argument("--threshold", type=float, default=4074.0, help="below it an episode failed")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=DEV_SEED + 20, help=f"first env seed (development: {DEV_SEED} on)")
    parser.add_argument("--backend", nargs="+", default=["eager"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "failing_episodes.json")
    args = parser.parse_args()
    if args.seed < DEV_SEED:
        parser.error(f"--seed: use development seeds ({DEV_SEED} on); the reporting seeds choose nothing")

    torch.set_num_threads(1)
    policy = Policy.from_module(PolicyModule.load_from_checkpoint(args.ckpt, map_location="cpu"))
    env = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "env" / "halfcheetah.yaml"))
    result = {"ckpt": args.ckpt, "target": args.target, "threshold": args.threshold, "backends": {}}
    for backend in args.backend:
        # trajectories are recorded by one worker; the backend runs the same weights
        out = rollout(
            policy, env, [args.target], args.episodes, seed=args.seed, record=True, progress=False, backend=backend
        )
        observations = np.asarray(out["trajectories"]["observations"])  # (N, T, 17)
        episodes = [
            {"seed": e["seed"], **describe(observations[i], e["return"], args.threshold)}
            for i, e in enumerate(out["episodes"])
        ]
        result["backends"][backend] = episodes
        failed = [e for e in episodes if e["kind"] != "ran"]
        print(f"{backend}: {len(failed)} of {len(episodes)} below {args.threshold:.0f}")
        for e in failed:
            print(
                f"  seed {e['seed']}: {e['return']:8.1f}  {e['kind']:16} flip step {e['flip_step']}, "
                f"speed {e['speed_first_50']} m/s over the first 50 steps, {e['speed_last_100']} over the last 100"
            )
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
