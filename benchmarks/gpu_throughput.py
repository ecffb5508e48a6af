"""GPU throughput in one short run: training samples/s (Lightning, the paper-size DT on the
embedded sample) and evaluation env steps/s (dtlab.rollout, one batched model call per step).

    python benchmarks/gpu_throughput.py                       # on the first CUDA device
    python benchmarks/gpu_throughput.py --precision bf16-mixed
    python benchmarks/gpu_throughput.py --device cpu --steps 20 --warmup 5 --episodes 2 --max-episode-steps 100

The last line is its own smoke test on a machine without a GPU (its numbers are a CPU's, not a
baseline for a GPU's). Prints one line per measurement and writes JSON (default
benchmarks/results/gpu_throughput_<device>.json) with the device, versions and settings.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import lightning as L
import torch
from train_throughput import timed_fit  # the script beside this one

from dtlab.data import load_episodes, load_sample
from dtlab.datamodule import TrajectoryDataModule
from dtlab.module import DTModule
from dtlab.policy import Policy
from dtlab.rollout import rollout

ENV = {"id": "HalfCheetah-v5", "obs_dim": 17, "act_dim": 6, "ref_min_score": -280.178953, "ref_max_score": 12135.0}
TARGETS = [6000.0, 12000.0]  # the env's paper targets
MAX_EP_LEN, SCALE = 1000, 0.001


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed")
    parser.add_argument("--steps", type=int, default=500, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=50, help="untimed steps first (CUDA init, autotuning)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--episodes", type=int, default=50, help="evaluation episodes per target")
    parser.add_argument("--max-episode-steps", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: use --device cpu for the smoke test")
    if args.threads:
        torch.set_num_threads(args.threads)
    L.seed_everything(0, verbose=False)
    data = TrajectoryDataModule(load_episodes(load_sample, 17, 6), MAX_EP_LEN, 20, args.batch, SCALE, val_fraction=0.0)
    data.setup()
    # the paper's model size (DTModule's defaults: 3 layers, 128 dims, 1 head, K=20)
    module = DTModule(ENV["id"], 17, 6, MAX_EP_LEN, data.state_mean.tolist(), data.state_std.tolist(), SCALE)
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    seconds = timed_fit(
        module, data, args.steps, args.warmup, accelerator=accelerator, devices=1, precision=args.precision
    )
    samples_per_s = args.steps * args.batch / seconds
    print(f"training: {samples_per_s:.0f} samples/s ({args.steps} steps of {args.batch}, {args.precision})")

    device = torch.device(args.device)
    env = ENV | {"max_episode_steps": args.max_episode_steps}
    policy = Policy.from_module(module.to(device))
    start = time.perf_counter()
    result = rollout(policy, env, TARGETS, args.episodes, seed=10_000, backend="eager", workers=1, progress=False)
    seconds = time.perf_counter() - start
    env_steps = sum(e["length"] for e in result["episodes"])
    print(f"evaluation: {env_steps / seconds:.0f} env steps/s ({len(result['episodes'])} envs in lockstep)")

    record = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu",
        "settings": vars(args) | {"out": None},
        "training_samples_per_s": samples_per_s,
        "evaluation_env_steps_per_s": env_steps / seconds,
        "evaluation_env_steps": env_steps,
        "returns": {f"{s['target']:g}": s["return_mean"] for s in result["summary"]},
        "versions": {"torch": torch.__version__, "lightning": L.__version__, "cuda": torch.version.cuda},
        "threads": torch.get_num_threads(),
    }
    out = args.out or Path(__file__).parent / "results" / f"gpu_throughput_{args.device}.json"
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
