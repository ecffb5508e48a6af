"""The DT recipe study on the shared datasets, on development seeds (issue 30).

Each variant is a set of overrides on the dataset presets (experiment=<dataset>, the CPU budget
of conf/experiment/cpu-budget.yaml). A variant's runs train with seeds 100 on (never the
reporting runs' 0-2) and take their final evaluation on the development env seeds
(eval.dev_seed=20000), at the paper's targets and 8 more across the data's returns
(target_return=sweep; the baselines, flat by construction, at the paper's two), so that nothing
chosen here is measured on reporting episodes.

    python benchmarks/recipe_study.py run --variants reference notime-nodrop \\
        --datasets hopper-mixed walker2d-mixed --data-dir ../shared/data
    python benchmarks/recipe_study.py summarize outputs/study/* --out benchmarks/results/recipe_study

`run` starts one multirun per variant (two jobs side by side, one thread each); `summarize`
writes one compact JSON per variant: per run the last.ckpt summary at every final target, the
headline target's normalized score, Spearman and slope over the targets (dtlab.report), the
in-training curve (selection seeds) and the steps and wall time it took to reach 90% of its
final in-training score.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

from dtlab.report import calibration
from dtlab.rollout import DEV_SEED

# name -> overrides on top of the preset; "preset-gpt2" is the preset before model.init existed
VARIANTS: dict[str, list[str]] = {
    "preset-gpt2": ["model.init=gpt2"],
    "reference": [],
    "nodrop": ["model.dropout=0.0"],
    "notime-nodrop": ["++model.timestep_embedding=false", "model.dropout=0.0"],
    "notime-nodrop-rs1e-4": ["++model.timestep_embedding=false", "model.dropout=0.0", "data.reward_scale=0.0001"],
    # (keys that model=small lacks take ++: a multirun checks each override before the presets)
    "notime-nodrop-gpt2-torchreturn": [
        "model.init=gpt2",
        "++model.return_init=torch",
        "++model.timestep_embedding=false",
        "model.dropout=0.0",
    ],
    "nodrop-K20": ["model.dropout=0.0", "model.context_length=20"],
    "notime-nodrop-lr1e-3": ["++model.timestep_embedding=false", "model.dropout=0.0", "model.learning_rate=1.0e-3"],
    "notime-nodrop-b128": ["++model.timestep_embedding=false", "model.dropout=0.0", "data.batch_size=128"],
    "notime-nodrop-lr3e-4": ["++model.timestep_embedding=false", "model.dropout=0.0", "model.learning_rate=3.0e-4"],
    "notime-nodrop-K20": ["++model.timestep_embedding=false", "model.dropout=0.0", "model.context_length=20"],
    # the budget: 3x the preset's steps (the cosine schedule stretched over them)
    "notime-nodrop-12k": ["++model.timestep_embedding=false", "model.dropout=0.0", "trainer.max_steps=12000"],
    # both at once: the budget that might reach 10%BC on hopper-mixed (K=20 alone: 101.7 of 104.6)
    "notime-nodrop-K20-12k": [
        "++model.timestep_embedding=false",
        "model.dropout=0.0",
        "model.context_length=20",
        "trainer.max_steps=12000",
    ],
    # the baselines, for BC's training rule (run once on this code and once on the code before it)
    # (their return-conditioning curve is flat by construction: the paper's two targets suffice)
    "bc": ["algo=bc", "target_return=paper"],
    "pct_bc": ["algo=pct_bc", "target_return=paper"],
}
COMMON = [
    f"eval.dev_seed={DEV_SEED}",
    "eval.every_n_steps=500",
    "logger=csv",
    "threads=1",
    "hydra/launcher=joblib",
    "hydra.launcher.n_jobs=2",
]


def run(args: argparse.Namespace) -> None:
    for name in args.variants:
        sweep_dir = Path(args.out) / f"{name}{args.suffix}"
        cmd = [
            sys.executable,
            "-m",
            "dtlab.train",
            "-m",
            f"experiment={','.join(args.datasets)}",
            f"seed={','.join(map(str, args.seeds))}",
            f"++data_dir={args.data_dir}",  # the presets define it; a multirun checks it before them
            *COMMON,
            *([] if any(o.startswith("target_return=") for o in VARIANTS[name]) else ["target_return=sweep"]),
            *VARIANTS[name],
            f"hydra.sweep.dir={sweep_dir}",
        ]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


def steps_to_fraction(history: list[dict], fraction: float = 0.9) -> int | None:
    """The first in-training evaluation step whose score reaches `fraction` of the last one's."""
    scores = [(h["step"], h["eval/normalized_score"]) for h in history if "eval/normalized_score" in h]
    if not scores:
        return None
    final = scores[-1][1]
    return next(step for step, score in scores if score >= fraction * final)


def summarize_run(run_dir: Path) -> dict:
    final = json.loads((run_dir / "final_evaluation.json").read_text())
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    last = final["checkpoints"]["last"]
    summary = last["summary"]
    headline = max(config["env"]["target_returns"])
    at_headline = next(s for s in summary if s["target"] == headline)
    steps, wall = final["steps"], final["wall_time_s"]
    to90 = steps_to_fraction(final.get("history", []))
    data = final.get("data_returns")
    return {
        "run": str(run_dir),
        "dataset": next(o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")),
        "seed": config["seed"],
        "overrides": overrides,
        "seeds_role": last["protocol"]["seeds_role"],
        "env_seeds": last["protocol"]["seeds"],
        "episodes_per_target": last["protocol"]["episodes_per_target"],
        "steps": steps,
        "wall_time_s": wall,
        "steps_to_90pct": to90,
        "wall_to_90pct_s": None if to90 is None else wall * to90 / steps,
        "headline_target": headline,
        "headline_normalized": at_headline["normalized_score"],
        "calibration": calibration(summary, [data["min"], data["max"]] if data else None),
        "targets": [{k: s[k] for k in ("target", "return_mean", "return_std", "normalized_score")} for s in summary],
        "curve": [
            [h["step"], h["eval/normalized_score"]] for h in final.get("history", []) if "eval/normalized_score" in h
        ],
    }


def variant_of(sweep_name: str) -> str:
    """The variant a sweep dir ran: its name less the --suffix (e.g. notime-nodrop-K20-s101)."""
    return max((v for v in VARIANTS if sweep_name == v or sweep_name.startswith(f"{v}-")), key=len, default=sweep_name)


def summarize(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for sweep in map(Path, args.sweeps):
        runs = [summarize_run(p.parent) for p in sorted(sweep.glob("*/final_evaluation.json"))]
        if not runs:
            print(f"{sweep}: no finished run", file=sys.stderr)
            continue
        path = out / f"{sweep.name}.json"
        path.write_text(
            json.dumps(
                {"variant": variant_of(sweep.name), "overrides": VARIANTS.get(variant_of(sweep.name)), "runs": runs},
                indent=1,
            )
        )
        for r in runs:
            cal = r["calibration"]
            print(
                f"{sweep.name:32s} {r['dataset']:28s} seed {r['seed']:3d}  headline {r['headline_normalized']:6.1f}  "
                f"spearman {cal['spearman'] if cal['spearman'] is None else round(cal['spearman'], 2)}  "
                f"slope {cal['slope'] if cal['slope'] is None else round(cal['slope'], 2)}  "
                f"wall {r['wall_time_s'] / 60:5.1f} min  90% at step {r['steps_to_90pct']}"
            )
        print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), required=True)
    r.add_argument("--datasets", nargs="+", required=True, help="experiment presets, e.g. hopper-mixed")
    r.add_argument("--seeds", nargs="+", type=int, default=[100], help="training seeds (development: 100 on)")
    r.add_argument("--data-dir", required=True)
    r.add_argument("--out", default="outputs/study")
    r.add_argument("--suffix", default="", help="appended to each sweep dir's name (e.g. -before for older code)")
    s = sub.add_parser("summarize")
    s.add_argument("sweeps", nargs="+")
    s.add_argument("--out", default="benchmarks/results/recipe_study")
    args = parser.parse_args()
    run(args) if args.command == "run" else summarize(args)


if __name__ == "__main__":
    main()
