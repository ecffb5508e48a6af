"""The results table: train HalfCheetah presets for several seeds, evaluate last and best.

    python benchmarks/results.py --data-dir ../shared/data

For each dataset and seed: `python -m dtlab.train experiment=halfcheetah-<dataset>
seed=<seed> data_dir=<data-dir>` (point --data-dir at other files in the same layout to rerun
it on them), then `python -m dtlab.evaluate` on `last.ckpt` and `best.ckpt` with
`target_return=paper` and `target_return=dataset`, `--episodes` episodes per target.
`--jobs` runs go side by side, one torch thread each (the presets set threads=1).
Writes benchmarks/results/results.json ({runs, behaviour}) and results.md (the README table).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from dtlab.data import episodes_from_dataset, load_local
from dtlab.rollout import normalized_score

FILES = {
    "medium": ["halfcheetah-medium-v5.parquet"],
    "expert": ["halfcheetah-expert-v5.parquet"],
    "mixed": ["halfcheetah-mixed-v5.parquet"],
    "medium-expert": ["halfcheetah-medium-v5.parquet", "halfcheetah-expert-v5.parquet"],
}
HALFCHEETAH = {"ref_min_score": -280.178953, "ref_max_score": 12135.0}


def run(dataset: str, seed: int, args: argparse.Namespace) -> list[dict]:
    """Train one preset and seed, evaluate both checkpoints; one row per (checkpoint, target)."""
    run_dir = args.out / "runs" / f"{dataset}-seed{seed}"
    train = [
        sys.executable,
        "-m",
        "dtlab.train",
        f"experiment=halfcheetah-{dataset}",
        f"seed={seed}",
        f"data_dir={args.data_dir.resolve()}",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
        *args.overrides,
    ]
    start = time.perf_counter()
    _run(train, run_dir / "train.out")
    wall = time.perf_counter() - start
    rows = []
    for checkpoint in ("last", "best"):
        ckpt = run_dir / "checkpoints" / f"{checkpoint}.ckpt"
        steps = int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])
        for target_set in ("paper", "dataset"):
            out = run_dir / f"eval-{checkpoint}-{target_set}"
            _run(
                [
                    sys.executable,
                    "-m",
                    "dtlab.evaluate",
                    f"ckpt_path={ckpt}",
                    f"target_return={target_set}",
                    f"eval.episodes={args.episodes}",
                    f"eval.seed={args.eval_seed}",
                    "threads=1",
                    f"hydra.run.dir={out}",
                ],
                out.with_suffix(".out"),
            )
            for s in json.loads((out / "evaluation.json").read_text())["summary"]:
                rows.append(
                    {
                        "dataset": dataset,
                        "seed": seed,
                        "checkpoint": checkpoint,
                        "target_set": target_set,
                        "target": s["target"],
                        "return_mean": s["return_mean"],
                        "return_std": s["return_std"],
                        "normalized_score": s["normalized_score"],
                        "wall_s": wall,
                        "steps": steps,
                    }
                )
    print(f"done: {dataset} seed {seed} in {wall / 60:.1f} min", flush=True)
    return rows


def _run(cmd: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
            raise SystemExit(f"failed: {' '.join(cmd)} (see {log})")


def behaviour(data_dir: Path, dataset: str) -> dict:
    """The behaviour policy's mean return and normalized score, from the data itself."""
    returns = np.concatenate([episodes_from_dataset(load_local(str(data_dir / f))).returns for f in FILES[dataset]])
    return {
        "return_mean": float(returns.mean()),
        "normalized_score": float(normalized_score(returns.mean(), HALFCHEETAH)),
    }


def table(runs: list[dict], behaviours: dict) -> str:
    """Per dataset and target: DT's normalized score, mean +- std over seeds, last and best."""
    lines = [
        "| dataset | behaviour return (norm.) | target | DT last | DT best | seeds | steps | wall min |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for dataset, b in behaviours.items():
        rows = [r for r in runs if r["dataset"] == dataset]
        for target_set, target in dict.fromkeys((r["target_set"], round(r["target"])) for r in rows):
            cells = []
            for checkpoint in ("last", "best"):
                scores = [
                    r["normalized_score"]
                    for r in rows
                    if r["checkpoint"] == checkpoint and r["target_set"] == target_set and round(r["target"]) == target
                ]
                cells.append(f"{np.mean(scores):.1f} +- {np.std(scores):.1f}")
            seeds = len({r["seed"] for r in rows})
            wall = np.mean([r["wall_s"] for r in rows]) / 60
            lines.append(
                f"| {dataset} | {b['return_mean']:.0f} ({b['normalized_score']:.1f}) | {target_set} {target} "
                f"| {cells[0]} | {cells[1]} | {seeds} | {rows[0]['steps']} | {wall:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--datasets", nargs="+", default=["medium", "expert", "mixed"], choices=list(FILES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--episodes", type=int, default=10, help="per target")
    parser.add_argument("--eval-seed", type=int, default=1000, help="apart from the in-training evaluation's seeds")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every training run")
    args = parser.parse_args()

    start = time.perf_counter()
    jobs = [(d, s) for d in args.datasets for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = [row for rows in pool.map(lambda job: run(*job, args), jobs) for row in rows]
    behaviours = {d: behaviour(args.data_dir, d) for d in args.datasets}
    total = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"runs": runs, "behaviour": behaviours, "total_wall_s": total, "jobs": args.jobs}
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    markdown = table(runs, behaviours)
    (args.out / "results.md").write_text(markdown + "\n")
    print(markdown)
    print(f"total wall time: {total / 60:.1f} min with {args.jobs} jobs")


if __name__ == "__main__":
    main()
