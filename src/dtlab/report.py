"""From runs to a paper table: `python -m dtlab.report DIR [DIR ...] [--out DIR] [--records DIR]`.

Finds every training run under the dirs (single runs, multirun sweeps, committed run
records), each once (by its run id), reads its final evaluation with its protocol record and
config, and groups the scores by env, dataset, algorithm, checkpoint and target. Runs whose
protocols (env version or horizon, episodes, seeds, library versions, the backend, workers
and threads that ran) or training setups (the whole resolved recipe, `setup`) differ are never
pooled; the keys that keep two groups apart are named. Every run not used is listed, with why.

Statistics: per group the mean over runs with its 95% Student-t CI (a percentile bootstrap
over 3 runs is their [min, max]); across tasks, as Agarwal et al. 2021 ("Deep RL at the Edge
of the Statistical Precipice", the rliable library), the interquartile mean (IQM) of all
runs' scores with a 95% stratified-bootstrap CI (runs resampled within each task) and the
probability of improvement of one algorithm over another. Return calibration per run: the
Spearman rank correlation of achieved against target return over all final targets, and the
least-squares slope over the targets within the data's return range. The headline score of a
group is at a target fixed before the run: the highest of its fixed targets
(`target_return.values`: in every preset the env's highest paper target, e.g. 12000 for
HalfCheetah; the sample's expert mean for the default run), never a max over achieved scores;
a run with no fixed target has no headline.

Writes report.md, report.tex, report.json and figures into --out (default: DIR/report).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from dtlab import DTLabError
from dtlab.cli import run_cli

log = logging.getLogger(__name__)
BOOTSTRAP_REPS = 10_000
CI = 0.95
# Every interval says its method (tables, figures, JSON): over a cell's runs the t interval,
# across tasks rliable's stratified bootstrap
CI_METHOD = "95% t-CI"  # mean +- t(0.975, n - 1) * std / sqrt(n), over runs (seeds)
BOOTSTRAP_METHOD = "95% stratified-bootstrap CI"  # percentile, 10,000 resamples of runs within each task


# ---------------------------------------------------------------------------------------------
# Statistics (plain NumPy; tests/test_report.py checks them against rliable).


def iqm(scores: np.ndarray) -> float:
    """Interquartile mean: the mean of the middle 50% (scipy.stats.trim_mean(x, 0.25))."""
    x = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    cut = int(0.25 * len(x))
    return float(x[cut : len(x) - cut].mean())


def bootstrap_ci(
    tasks: Sequence[np.ndarray], statistic: Callable[[list[np.ndarray]], float], seed: int = 0
) -> tuple[float, float]:
    """Percentile CI of `statistic` under stratified bootstrap: each task's runs are resampled
    with replacement, independently of the other tasks'. One task: the plain bootstrap."""
    rng = np.random.default_rng(seed)
    stats = np.empty(BOOTSTRAP_REPS)
    for i in range(BOOTSTRAP_REPS):
        stats[i] = statistic([t[rng.integers(0, len(t), len(t))] for t in tasks])
    alpha = (1 - CI) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return float(low), float(high)


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with integer `df` degrees of freedom, by bisection
    on its CDF, which has a closed form for integer df (Abramowitz and Stegun 26.7.3-4): NumPy
    only, exact to float precision (tests/test_report.py checks it against scipy)."""
    if df < 1 or not 0.5 < p < 1:
        raise ValueError(f"t_quantile needs df >= 1 and 0.5 < p < 1, not df={df}, p={p}")

    def central(t: float) -> float:  # P(|T| < t)
        theta = math.atan(t / math.sqrt(df))
        c2, term, total = math.cos(theta) ** 2, 1.0, 1.0
        if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 c2 + 2*4/(3*5) c2^2 + ...))
            for k in range(1, (df - 1) // 2):
                term *= c2 * 2 * k / (2 * k + 1)
                total += term
            return 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0))
        for k in range(1, df // 2):  # even: sin (1 + 1/2 c2 + 1*3/(2*4) c2^2 + ...)
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return math.sin(theta) * total

    lo, hi = 0.0, 1.0
    while central(hi) < 2 * p - 1:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if central(mid) < 2 * p - 1 else (lo, mid)
    return (lo + hi) / 2


def mean_ci(scores: np.ndarray) -> tuple[np.ndarray | float, np.ndarray | float]:
    """The Student-t CI (CI_METHOD) of the mean over runs, along the last axis (vectorized:
    the report computes one for every group and figure point, the coverage test for thousands of
    groups at once); NaN with fewer than 2 runs. At 3 runs a percentile bootstrap of the mean is
    the runs' [min, max] (each run resampled 3 times has probability 1/27 > 2.5%) and covers
    ~75%; the t interval holds its level at any n when the runs' scores are near normal."""
    x = np.asarray(scores, dtype=np.float64)
    n = x.shape[-1]
    if n < 2:
        nan = np.full(x.shape[:-1], np.nan)
        return (float(nan), float(nan)) if nan.ndim == 0 else (nan, nan)
    mean = x.mean(axis=-1)
    half = t_quantile(1 - (1 - CI) / 2, n - 1) * x.std(axis=-1, ddof=1) / math.sqrt(n)
    low, high = mean - half, mean + half
    return (float(low), float(high)) if np.ndim(low) == 0 else (low, high)


def probability_of_improvement(x: Sequence[np.ndarray], y: Sequence[np.ndarray]) -> float:
    """P(X > Y): per task the probability that a run of X beats a run of Y (ties count half,
    the Mann-Whitney U over n * m), averaged over tasks."""
    per_task = []
    for xs, ys in zip(x, y, strict=True):
        diff = np.asarray(xs, dtype=np.float64)[:, None] - np.asarray(ys, dtype=np.float64)[None, :]
        per_task.append(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)
    return float(np.mean(per_task))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation; None with fewer than 3 points or a constant side."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(_ranks(x), _ranks(y))[0, 1])


def slope(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Least-squares slope of y on x; None with fewer than 2 distinct x."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(np.unique(x)) < 2:
        return None
    return float(np.polyfit(x, y, 1)[0])


def calibration(summary: Sequence[dict], data_range: Sequence[float] | None) -> dict:
    """Does the achieved return follow the target? Over one run's final targets."""
    targets = [s["target"] for s in summary]
    achieved = [s["return_mean"] for s in summary]
    lo, hi = data_range if data_range else (math.inf, -math.inf)
    inside = [(t, a) for t, a in zip(targets, achieved, strict=True) if lo <= t <= hi]
    return {"spearman": spearman(targets, achieved), "slope": slope(*zip(*inside, strict=True)) if inside else None}


# ---------------------------------------------------------------------------------------------
# Runs and their records.


def dataset_label(dataset: dict) -> str:
    """A short name for a run's data: file stems, hub names, Minari ids, mixture sources."""
    target = (dataset or {}).get("_target_", "")
    if target.endswith("load_sample"):
        return "sample"
    if target.endswith("load_local"):
        paths = dataset.get("path")
        if paths is None:  # records from before load_sample: load_local(path=None) was the sample
            return "sample"
        paths = [paths] if isinstance(paths, str) else paths
        return "+".join(Path(p).name.split(".")[0] for p in paths)
    if target.endswith("load_hub"):
        names = dataset.get("name")
        return "+".join([names] if isinstance(names, str) else names)
    if target.endswith("load_hdf5"):
        return Path(dataset.get("path", "")).stem
    if target.endswith("load_minari"):
        return str(dataset.get("name"))
    if target.endswith("load_mixture"):
        return "mixture:" + "+".join(sorted(dataset.get("sources", {})))
    return target or "unknown"


def headline_target(record: dict) -> float | None:
    """The target a run's headline score is read at: the highest of the targets fixed before
    the run (`target_return.values`, as its final evaluation's protocol records them: in every
    preset the env's highest paper target, e.g. 12000 for HalfCheetah; the sample's expert mean
    for the default run) that the final evaluation ran at. None for a run whose targets are all
    data-relative (quantiles, multiples of the best return): no number of it was fixed before
    it, so it is in no table (build_report lists it, with the reason)."""
    protocol = next(iter(record["checkpoints"].values()))["protocol"]
    ran = protocol["targets"]
    fixed = [float(v) for v in protocol["target_rule"]["values"] if any(math.isclose(v, t) for t in ran)]
    return max(fixed) if fixed else None


def to_record(final: dict, run: str) -> dict:
    """A run's compact record (a few KB): what the report needs, without the episodes."""
    config = final.get("config") or {}
    env = config.get("env", {})
    record = {
        "kind": "run_record",
        "run": run,
        "run_id": final.get("run_id"),  # None for runs from before run ids (run_id() says what stands in)
        "env_id": env.get("id"),
        "dataset": dataset_label(config.get("dataset", {})),
        "algo": (config.get("algo") or {}).get("name", "dt"),
        "seed": config.get("seed"),
        "ref_scores": [env.get("ref_min_score"), env.get("ref_max_score")],
        "steps": final.get("steps"),
        "wall_time_s": final.get("wall_time_s"),
        "data_returns": final.get("data_returns"),
        "history": final.get("history", []),
        "checkpoints": {
            name: {"protocol": c["protocol"], "summary": c["summary"]} for name, c in final["checkpoints"].items()
        },
        "config": config,
    }
    return record | {"headline_target": headline_target(record) if record["checkpoints"] else None}


def run_id(record: dict) -> str:
    """A run's identity, whatever folder or copy its record is read from: the id dtlab.train
    wrote into its final_evaluation.json; for runs from before that, the run dir it was trained
    in (its resolved config's paths.output_dir), else its name under the dirs given."""
    if record.get("run_id"):
        return str(record["run_id"])
    output_dir = ((record.get("config") or {}).get("paths") or {}).get("output_dir")
    return f"dir:{output_dir}" if output_dir else f"name:{record['run']}"


def _scores(record: dict) -> dict:
    return {
        name: [(s["target"], s["normalized_score"]) for s in c["summary"]] for name, c in record["checkpoints"].items()
    }


def dedupe(records: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """(records, not used): each run once, however many dirs or record folders reach it (the
    first found is kept); a second record of a run is listed, and a warning logged when it does
    not hold the same scores (two runs given one id, or a record edited)."""
    kept: dict[str, dict] = {}
    not_used = []
    for r in records:
        key = run_id(r)
        first = kept.setdefault(key, r)
        if first is r:
            continue
        if _scores(first) == _scores(r):
            not_used.append({"run": r["run"], "reason": f"the same run as {first['run']} (run id {key}): counted once"})
        else:
            reason = f"shares run id {key} with {first['run']} but not its scores: only {first['run']} is used"
            log.warning("%s %s", r["run"], reason)
            not_used.append({"run": r["run"], "reason": reason})
    return list(kept.values()), not_used


def find_runs(dirs: Iterable[str | Path]) -> tuple[list[dict], list[dict]]:
    """(records, not used): a record per finished run under the dirs (run dirs with a final
    evaluation, and committed `*.json` run records), each run once (dedupe), and {run, reason}
    for every run that could not be used."""
    records, not_used = [], []
    for root in map(Path, dirs):
        if not root.exists():
            raise DTLabError(f"{str(root)!r} does not exist: give run dirs, sweep dirs or record folders")
        for config in sorted(root.rglob(".hydra/config.yaml")):
            run_dir = config.parent.parent
            name = str(run_dir.relative_to(root.parent)) if run_dir != root else root.name
            if "trainer:" not in config.read_text():
                continue  # a dtlab.evaluate run, not a training run
            final = run_dir / "final_evaluation.json"
            if not final.is_file():
                not_used.append(
                    {"run": name, "reason": "no final_evaluation.json (unfinished, or eval.final_episodes=0)"}
                )
                continue
            try:
                data = json.loads(final.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                not_used.append({"run": name, "reason": f"final_evaluation.json is not JSON ({e})"})
                continue
            if "config" not in data or not data.get("checkpoints"):
                not_used.append({"run": name, "reason": "final_evaluation.json lacks its config or checkpoints"})
                continue
            records.append(to_record(data, name))
        for path in sorted(root.rglob("*.json")):
            if ".hydra" in path.parts or path.name in ("final_evaluation.json", "report.json"):
                continue
            try:
                data = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(data, dict) and data.get("kind") == "run_record":
                records.append(data)
    records, twice = dedupe(records)
    return records, not_used + twice


def write_records(records: Sequence[dict], folder: Path) -> list[Path]:
    """One JSON file per run, named after it: the results that outlive the run dirs."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in records:
        path = folder / (re.sub(r"[^A-Za-z0-9_.=-]+", "_", r["run"]).strip("_") + ".json")
        path.write_text(json.dumps(r, indent=1))
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# Grouping and the report.

# The protocol: what a score was measured under (rollout.protocol). The backend, workers and
# threads decide the episodes (their floating-point sums differ, and MuJoCo episodes amplify
# that); records written before the protocol held them do not say them (None).
PROTOCOL_FIELDS = (
    "env",
    "horizon",
    "episodes",
    "seeds",
    "gymnasium",
    "mujoco",
    "backend",
    "workers",
    "threads",
    "onnxruntime",
)


def protocol_key(protocol: dict) -> tuple:
    v = protocol["versions"]
    return (
        protocol["env_id"],
        protocol["max_episode_steps"],
        protocol["episodes_per_target"],
        tuple(protocol["seeds"]),
        v.get("gymnasium"),
        v.get("mujoco"),
        protocol.get("backend"),
        protocol.get("workers"),
        protocol.get("threads"),
        v.get("onnxruntime"),
    )


# The setup: the resolved config's groups that decide what a run learns and which checkpoint
# it keeps, each whole but for what cannot change its numbers: seeds, paths (a file's name
# stays: it says which data), and what decides how fast, not what (threads, eval backend and
# workers, logging, progress, compile). `eval` and `target_return` are in for best.ckpt (picked
# on the in-training evaluations) and ODT's exploration return; their final-evaluation keys are
# the protocol's. A key absent from an older record is its schema default: the code's
# behaviour before the key existed.
SETUP_GROUPS = ("env", "dataset", "data", "model", "algo", "online", "trainer", "target_return", "eval")
NOT_THE_NUMBERS = {
    "env": {"target_returns", "max_ep_len"},  # targets are cell keys; the timestep table is data.max_ep_len
    "dataset": {"_partial_"},
    "data": {"_target_", "seed", "ref_scores", "val_batches"},  # ref_scores, val_batches: the data report, val/
    "model": {"_target_", "compile"},
    "algo": {"cpu_budget_steps"},  # a preset's knob for trainer.max_steps, which is in
    "online": {"_target_", "seed", "checkpoints_dir"},
    "trainer": {
        "_target_",
        "accelerator",
        "default_root_dir",
        "plugins",
        "logger",
        "callbacks",
        "enable_progress_bar",
        "enable_model_summary",
        "enable_checkpointing",
        "log_every_n_steps",
        "val_check_interval",
        "check_val_every_n_epoch",
        "num_sanity_val_steps",
        "limit_val_batches",
    },
    "target_return": {"final_sweep_points", "final_sweep_top"},
}
EVAL_SETUP = ("episodes", "every_n_steps")  # the in-training evaluations that pick best.ckpt


def _schema_defaults() -> dict[str, dict]:
    from dtlab.config import Algo, Data, Model, Online, TargetReturn

    schemas = {"model": Model, "data": Data, "online": Online, "algo": Algo, "target_return": TargetReturn}
    return {
        group: {n: f.default for n, f in schema.model_fields.items() if not f.is_required() and f.alias is None}
        for group, schema in schemas.items()
    }


def _canonical(value: object, key: str = "") -> object:
    """JSON-stable values: numbers as floats (6000 and 6000.0 are one target), paths as file names."""
    if isinstance(value, dict):
        return {k: _canonical(v, k) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v, key) for v in value]
    if key == "path" and isinstance(value, str):
        return Path(value).name
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            flat |= _flatten(v, f"{prefix}{k}.")
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def setup(config: dict) -> dict:
    """The run's training setup, flat ({"model.n_layer": 3.0, "data.reward_scale": 0.001, ...})."""
    defaults = _schema_defaults()
    tree = {}
    for group in SETUP_GROUPS:
        given = config.get(group)
        if not isinstance(given, dict):
            continue
        if group == "eval":
            given = {k: v for k, v in given.items() if k in EVAL_SETUP}
        if group == "dataset" and given.get("_target_", "").endswith("load_local") and given.get("path") is None:
            given = {"_target_": "dtlab.data.load_sample"}  # the sample's loader before load_sample existed
        merged = defaults.get(group, {}) | given
        tree[group] = {k: v for k, v in merged.items() if k not in NOT_THE_NUMBERS.get(group, ())}
    return _flatten(_canonical(tree))


def setup_hash(flat: dict) -> str:
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:12]


def differences(pairs: Sequence[tuple[tuple, dict]]) -> str:
    """The protocol fields and setup keys that differ between groups that would otherwise pool
    (`episodes, data.reward_scale, model.timestep_embedding`); each pair (protocol key, setup)."""
    names = [n for i, n in enumerate(PROTOCOL_FIELDS) if len({p[i] for p, _ in pairs}) > 1]
    keys = sorted(set().union(*(s for _, s in pairs)))
    names += [k for k in keys if len({json.dumps(s.get(k, "<absent>"), sort_keys=True) for _, s in pairs}) > 1]
    return ", ".join(names)


def normalized(returns: float, ref: Sequence[float]) -> float:
    return 100.0 * (returns - ref[0]) / (ref[1] - ref[0])


def _not_a_result(record: dict) -> str | None:
    """Why a run's scores are no result, or None: an evaluation on seeds other than the
    reporting ones (development seeds: a recipe study's), or no target fixed before the run."""
    roles = sorted({c["protocol"].get("seeds_role", "reporting") for c in record["checkpoints"].values()})
    if roles == ["development"]:
        return "development seeds (seeds_role: development): a recipe study's evaluation, never a result"
    if roles != ["reporting"]:
        return f"evaluated on {' and '.join(roles)} seeds, not the reporting ones"
    if headline_target(record) is None:
        return (
            "no fixed target: its targets are all data-relative (target_return.values is empty), so it has no "
            "headline score; give target_return.values to report it"
        )
    return None


def build_report(records: Sequence[dict], not_used: Sequence[dict]) -> dict:
    cells = defaultdict(list)  # (env, dataset, algo, checkpoint, target, fingerprint) -> per-run dicts
    setups = {}  # fingerprint -> (protocol key, setup)
    not_used = list(not_used)
    used = []
    for r in records:
        reason = _not_a_result(r)
        if reason:
            not_used.append({"run": r["run"], "reason": reason})
            continue
        used.append(r)
        flat = setup(r.get("config") or {})
        headline = headline_target(r)
        for checkpoint, c in r["checkpoints"].items():
            data = r.get("data_returns")
            cal = calibration(c["summary"], (data["min"], data["max"]) if data else None)
            fp = (protocol_key(c["protocol"]), setup_hash(flat))
            setups[fp] = (fp[0], flat)
            for s in c["summary"]:
                key = (r["env_id"], r["dataset"], r["algo"], checkpoint, s["target"], fp)
                cells[key].append(
                    {"record": r, "summary": s, "calibration": cal, "protocol": c["protocol"], "headline": headline}
                )
    pooled = defaultdict(set)
    for env, dataset, algo, checkpoint, target, fp in cells:
        pooled[(env, dataset, algo, checkpoint, target)].add(fp)
    groups = []
    for (env, dataset, algo, checkpoint, target, fp), runs in sorted(cells.items(), key=_order):
        scores = np.array([run["summary"]["normalized_score"] for run in runs])
        first = runs[0]["record"]
        low, high = mean_ci(scores)
        spearmans = [run["calibration"]["spearman"] for run in runs if run["calibration"]["spearman"] is not None]
        slopes = [run["calibration"]["slope"] for run in runs if run["calibration"]["slope"] is not None]
        data = first.get("data_returns") or {}
        others = pooled[(env, dataset, algo, checkpoint, target)]
        groups.append(
            {
                "env": env,
                "dataset": dataset,
                "algo": algo,
                "checkpoint": checkpoint,
                "target": target,
                "headline": math.isclose(target, runs[0]["headline"]),
                "runs": len(runs),
                "seeds": sorted(run["record"]["seed"] for run in runs),
                "run_ids": [run_id(run["record"]) for run in runs],
                "scores": scores.tolist(),
                "mean": float(scores.mean()),
                "std": float(scores.std(ddof=1)) if len(scores) > 1 else 0.0,
                "ci_low": None if math.isnan(low) else low,
                "ci_high": None if math.isnan(high) else high,
                "ci_method": CI_METHOD,
                "calibration": {
                    "spearman": float(np.mean(spearmans)) if spearmans else None,
                    "slope": float(np.mean(slopes)) if slopes else None,
                },
                "behaviour": normalized(data["mean"], first["ref_scores"]) if "mean" in data else None,
                "episodes": runs[0]["summary"]["episodes"],
                "steps": sorted({run["record"]["steps"] for run in runs}),
                "wall_time_min": float(np.mean([run["record"]["wall_time_s"] or 0 for run in runs]) / 60),
                "protocol": dict(zip(PROTOCOL_FIELDS, fp[0], strict=True)),
                "setup_hash": fp[1],  # the setup itself: report["setups"][setup_hash]
                "protocol_differs": differences([setups[o] for o in sorted(others, key=str)])
                if len(others) > 1
                else "",
                "target_rule": runs[0]["protocol"]["target_rule"],
            }
        )
    by_hash = {fp[1]: flat for fp, (_, flat) in setups.items()}
    choose_table(groups, by_hash)
    return {
        "groups": groups,
        "setups": by_hash,
        "aggregates": aggregates(groups),
        "improvement": improvements(groups),
        "not_used": not_used,
        "runs": len(used),
        "wall_time_min_total": float(sum((r.get("wall_time_s") or 0) for r in used) / 60),
    }


ALGO_ORDER = {"dt": 0, "odt": 1, "odt_offline": 2, "bc": 3, "pct_bc": 4}
# Keys an algorithm sets for itself (conf/algo/*.yaml, experiment=cpu-budget's step budget per
# algorithm): a baseline's cell differs from the DT's there by design, and is marked only
# where it differs elsewhere (data, env, trainer, evaluation).
ALGO_OWN = ("algo.", "model.", "online.", "data.top_fraction", "data.context_length", "trainer.max_steps")


def _order(item: tuple) -> tuple:
    """Rows by env, dataset, algorithm (DT first, then its baselines), last before best, target."""
    env, dataset, algo, checkpoint, target, fp = item[0]
    return (env, dataset, ALGO_ORDER.get(algo, 9), algo, checkpoint != "last", target, str(fp))


def choose_table(groups: Sequence[dict], setups: dict[str, dict]) -> None:
    """Mark the groups of the paper table and the aggregates (`in_table`): per task (env,
    dataset), last.ckpt at the headline target, under the one protocol most of the task's runs
    share (so that no row mixes protocols), and per algorithm the setup most of its runs of that
    protocol share; both choices count runs, never look at scores. A cell whose setup differs
    from the row's DT outside the algorithm's own keys (ALGO_OWN) says which keys
    (`differs_from_dt`)."""
    headline = [g for g in groups if g["checkpoint"] == "last" and g["headline"]]
    counts = defaultdict(lambda: defaultdict(int))  # task -> protocol -> runs
    for g in headline:
        counts[(g["env"], g["dataset"])][json.dumps(g["protocol"])] += g["runs"]
    protocol = {task: max(sorted(c), key=lambda p: c[p]) for task, c in counts.items()}
    chosen = {}
    for g in headline:
        task = (g["env"], g["dataset"])
        if json.dumps(g["protocol"]) == protocol[task]:
            best = chosen.get((task, g["algo"]))
            if best is None or (g["runs"], best["setup_hash"]) > (best["runs"], g["setup_hash"]):
                chosen[(task, g["algo"])] = g
    for g in groups:
        g["in_table"] = False
        g["differs_from_dt"] = ""
    for (task, algo), g in chosen.items():
        g["in_table"] = True
        dt = chosen.get((task, "dt"))
        if dt is not None and algo != "dt":
            pair = [(_key(x), setups[x["setup_hash"]]) for x in (dt, g)]
            keys = differences(pair).split(", ")
            g["differs_from_dt"] = ", ".join(k for k in keys if k and not k.startswith(ALGO_OWN))


def _key(group: dict) -> tuple:
    """A group's protocol key, back from its dict (seeds hashable again, as after JSON)."""
    return tuple(tuple(v) if isinstance(v, list) else v for v in group["protocol"].values())


def _table_tasks(groups: Sequence[dict]) -> dict[str, dict[tuple, np.ndarray]]:
    """algo -> {(env, dataset): scores of its runs} over the groups choose_table kept."""
    tasks = defaultdict(dict)
    for g in groups:
        if g["in_table"]:
            tasks[g["algo"]][(g["env"], g["dataset"])] = np.array(g["scores"])
    return tasks


def aggregates(groups: Sequence[dict]) -> list[dict]:
    out = []
    for algo, tasks in sorted(_table_tasks(groups).items()):
        scores = [tasks[t] for t in sorted(tasks)]
        low, high = bootstrap_ci(scores, lambda t: iqm(np.concatenate(t)))
        out.append(
            {
                "algo": algo,
                "tasks": len(tasks),
                "runs": int(sum(len(s) for s in scores)),
                "iqm": iqm(np.concatenate(scores)),
                "ci_low": low,
                "ci_high": high,
                "ci_method": BOOTSTRAP_METHOD,
            }
        )
    return out


def improvements(groups: Sequence[dict]) -> list[dict]:
    """P(X > Y) for every ordered pair of algorithms, over the tasks both have."""
    tasks = _table_tasks(groups)
    out = []
    for x in sorted(tasks):
        for y in sorted(tasks):
            common = sorted(set(tasks[x]) & set(tasks[y]))
            if x == y or not common:
                continue
            xs, ys = [tasks[x][t] for t in common], [tasks[y][t] for t in common]
            k = len(xs)
            # X's and Y's runs resampled independently within each task (rliable's
            # StratifiedIndependentBootstrap)
            low, high = bootstrap_ci(xs + ys, lambda t, k=k: probability_of_improvement(t[:k], t[k:]))
            value = probability_of_improvement(xs, ys)
            out.append(
                {
                    "x": x,
                    "y": y,
                    "tasks": k,
                    "probability": value,
                    "ci_low": low,
                    "ci_high": high,
                    "ci_method": BOOTSTRAP_METHOD,
                }
            )
    return out


# ---------------------------------------------------------------------------------------------
# Writing it out.


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _ci(g: dict) -> str:
    return "[-]" if g["ci_low"] is None else f"[{g['ci_low']:.1f}, {g['ci_high']:.1f}]"


def headline_rows(report: dict) -> list[dict]:
    return [g for g in report["groups"] if g["headline"]]


def protocol_line(report: dict) -> str:
    groups = report["groups"]
    if not groups:
        return "No finished runs."
    p = groups[0]["protocol"]
    seeds = sorted({tuple(g["protocol"]["seeds"]) for g in groups})
    episodes = sorted({g["episodes"] for g in groups})
    ran = sorted(
        {
            "not recorded (records written before evaluation records held it)"
            if g["protocol"]["backend"] is None
            else f"{g['protocol']['backend']}, {g['protocol']['workers']} worker(s) at {g['protocol']['threads']} "
            f"thread(s)" + (f", onnxruntime {g['protocol']['onnxruntime']}" if g["protocol"]["onnxruntime"] else "")
            for g in groups
        }
    )
    return (
        f"Protocol: final evaluation after training, on env seeds {', '.join(f'{a}-{b}' for a, b in seeds)} (the "
        f"reporting range: no in-training evaluation used them, so no number here was selected on the episodes "
        f"that report it), {', '.join(map(str, episodes))} episodes per target; score = D4RL-normalized return, "
        f"mean over runs (seeds) with its {CI_METHOD} (Student-t: mean +- t(0.975, n - 1) std / sqrt(n)); IQM "
        f"and P(X > Y) across tasks with a {BOOTSTRAP_METHOD} (rliable's: {BOOTSTRAP_REPS} resamples of the "
        f"runs within each task); headline target = the highest target fixed before the runs (in the presets, "
        f"the env's highest paper target); calibration = Spearman rank correlation of achieved against target "
        f"return over all final targets, and the least-squares slope within the data's return range (1 = the "
        f"return follows the target). gymnasium {p['gymnasium']}, mujoco {p['mujoco']}; evaluation backend: "
        f"{'; '.join(ran)}."
    )


ALGO_NAMES = {"dt": "DT", "bc": "BC", "pct_bc": "10%BC", "odt": "ODT", "odt_offline": "ODT offline-only"}


def paper_table(report: dict) -> list[str]:
    """The DT paper's layout (its Tables 2 and 3): a row per dataset, the behaviour policy's
    score and each algorithm's last.ckpt score at the headline target, mean [95% t-CI] over
    runs, with DT's calibration; each row under one protocol (choose_table), a cell whose setup
    differs from the row's DT beyond the algorithm's own keys marked with *, the keys below."""
    cells = {(g["env"], g["dataset"], g["algo"]): g for g in report["groups"] if g["in_table"]}
    algos = sorted({a for _, _, a in cells}, key=lambda a: (ALGO_ORDER.get(a, 9), a))
    tasks = sorted({(e, d) for e, d, _ in cells})
    lines = [
        "| env | dataset | behaviour | "
        + " | ".join(ALGO_NAMES.get(a, a) for a in algos)
        + " | DT Spearman | DT slope |",
        "| --- | --- | --- | " + " | ".join("---" for _ in algos) + " | --- | --- |",
    ]
    marked = []
    for env, dataset in tasks:
        row = [cells.get((env, dataset, a)) for a in algos]
        behaviour = next(g["behaviour"] for g in row if g)
        scores = []
        for g in row:
            if g is None:
                scores.append("-")
                continue
            mark = " \\*" if g["differs_from_dt"] else ""
            scores.append(f"{g['mean']:.1f} {_ci(g)} ({g['runs']}){mark}")
            if mark:
                marked.append(f"- \\* {env} {dataset} {ALGO_NAMES.get(g['algo'], g['algo'])}: {g['differs_from_dt']}")
        dt = cells.get((env, dataset, "dt"))
        cal = dt["calibration"] if dt else {"spearman": None, "slope": None}
        lines.append(
            f"| {env} | {dataset} | {_fmt(behaviour)} | {' | '.join(scores)} "
            f"| {_fmt(cal['spearman'], 2)} | {_fmt(cal['slope'], 2)} |"
        )
    if marked:
        lines += ["", "Setup differs from the row's DT beyond the algorithm's own keys:", *marked]
    return lines


def to_markdown(report: dict) -> str:
    lines = paper_table(report) + [
        "",
        f"Each cell: last.ckpt at the headline target, mean [{CI_METHOD}] (runs), each row under one protocol. "
        "Every checkpoint and algorithm:",
        "",
        f"| env | dataset | behaviour | algo | ckpt | target | runs | score (mean +- std) | {CI_METHOD} | Spearman "
        "| slope | steps | wall min |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for g in headline_rows(report):
        note = f" ({g['protocol_differs']} differ)" if g["protocol_differs"] else ""
        lines.append(
            f"| {g['protocol']['env']} | {g['dataset']}{note} | {_fmt(g['behaviour'])} | {g['algo']} "
            f"| {g['checkpoint']} "
            f"| {g['target']:g} | {g['runs']} | {g['mean']:.1f} +- {g['std']:.1f} | {_ci(g)} "
            f"| {_fmt(g['calibration']['spearman'], 2)} | {_fmt(g['calibration']['slope'], 2)} "
            f"| {'/'.join(map(str, g['steps']))} | {g['wall_time_min']:.1f} |"
        )
    lines += ["", protocol_line(report), ""]
    if report["aggregates"]:
        lines += [f"| algo | tasks | runs | IQM | {BOOTSTRAP_METHOD} |", "| --- | --- | --- | --- | --- |"]
        lines += [
            f"| {a['algo']} | {a['tasks']} | {a['runs']} | {a['iqm']:.1f} | [{a['ci_low']:.1f}, {a['ci_high']:.1f}] |"
            for a in report["aggregates"]
        ]
        lines.append("")
    for p in report["improvement"]:
        lines.append(
            f"- P({p['x']} > {p['y']}) = {p['probability']:.2f} [{p['ci_low']:.2f}, {p['ci_high']:.2f}] "
            f"({BOOTSTRAP_METHOD}) over {p['tasks']} tasks"
        )
    if report["not_used"]:
        lines += ["", "Not used:"] + [f"- {i['run']}: {i['reason']}" for i in report["not_used"]]
    lines.append(f"\n{report['runs']} runs, {report['wall_time_min_total']:.0f} min of training and evaluation in all.")
    return "\n".join(lines) + "\n"


def to_latex(report: dict) -> str:
    rows = [
        f"{g['protocol']['env']} & {g['dataset']} & {g['algo']} & {g['checkpoint']} & {g['target']:g} & {g['runs']} & "
        f"${g['mean']:.1f} \\pm {g['std']:.1f}$ & {_ci(g)} & "
        f"{_fmt(g['calibration']['spearman'], 2)} \\\\"
        for g in headline_rows(report)
    ]
    body = "\n".join(rows).replace("_", r"\_")
    return (
        "\\begin{tabular}{lllllrlll}\n\\toprule\n"
        f"env & dataset & algo & ckpt & target & runs & score & {CI_METHOD.replace('%', chr(92) + '%')} & "
        "Spearman \\\\\n\\midrule\n"
        f"{body}\n\\bottomrule\n\\end{{tabular}}\n"
    )


def plot_figures(records: Sequence[dict], out: Path) -> list[Path]:
    """Per dataset: every algorithm's return-conditioning curve (mean over runs, its 95% t-CI
    band, the diagonal, the data's range shaded), and its learning curve at the headline target;
    where runs finetuned online, a third panel: that curve against online env steps. Runs of
    another protocol or setup get curves of their own, labelled with what differs; runs the
    report does not use (build_report's reasons) get none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_task = defaultdict(lambda: defaultdict(list))  # (env, dataset) -> (algo, fingerprint) -> runs
    setups = {}
    for r in records:
        if "last" in r["checkpoints"] and _not_a_result(r) is None:
            flat = setup(r.get("config") or {})
            fp = (protocol_key(r["checkpoints"]["last"]["protocol"]), setup_hash(flat))
            setups[fp] = (fp[0], flat)
            by_task[(r["env_id"], r["dataset"])][(r["algo"], fp)].append(r)
    labelled = {}
    for task, curves in by_task.items():
        for algo, fp in curves:
            flat, episodes = setups[fp][1], fp[0][PROTOCOL_FIELDS.index("episodes")]
            K, steps = flat.get("model.context_length"), flat.get("trainer.max_steps")
            label = f"{algo} (K={_fmt(K, 0)}, {_fmt(steps, 0)} steps, {episodes} ep.)"
            same = [setups[f] for a, f in curves if a == algo]
            if len(same) > 1:  # say what keeps this curve apart from its algorithm's others
                keys = differences(same).split(", ")
                label += " [" + ", ".join(f"{k}={_short(k, fp, setups)}" for k in keys[:3]) + "]"
            labelled.setdefault(task, {})[label] = curves[(algo, fp)]
    by_task = labelled
    paths = []
    for (env, dataset), algos in sorted(by_task.items()):
        online = any(_online_curve(runs) for runs in algos.values())
        fig, axes = plt.subplots(1, 3 if online else 2, figsize=(15 if online else 10, 4), dpi=100)
        ax, lc = axes[:2]
        lo, hi = [], []
        for algo, runs in sorted(algos.items()):
            targets = sorted(
                set.intersection(*({s["target"] for s in r["checkpoints"]["last"]["summary"]} for r in runs))
            )
            per_run = np.array(
                [
                    [
                        next(s["return_mean"] for s in r["checkpoints"]["last"]["summary"] if s["target"] == t)
                        for t in targets
                    ]
                    for r in runs
                ]
            )  # (runs, targets)
            mean = per_run.mean(0)
            band = np.stack(mean_ci(per_run.T), axis=1)  # (targets, 2)
            (line,) = ax.plot(targets, mean, "o-", label=f"{algo} ({len(runs)} runs)")
            ax.fill_between(targets, band[:, 0], band[:, 1], color=line.get_color(), alpha=0.2)
            lo += [min(targets), float(np.nanmin(band, initial=mean.min()))]
            hi += [max(targets), float(np.nanmax(band, initial=mean.max()))]
            curve = _learning_curve(runs)
            if curve:
                steps, values = curve
                lc.plot(steps, values.mean(0), "o-", color=line.get_color(), label=algo)
                if len(values) > 1:
                    lc.fill_between(steps, *mean_ci(values.T), color=line.get_color(), alpha=0.2)
            curve = _online_curve(runs) if online else None
            if curve:
                env_steps, values = curve
                axes[2].plot(env_steps, values.mean(0), "o-", color=line.get_color(), label=algo)
                if len(values) > 1:
                    axes[2].fill_between(env_steps, *mean_ci(values.T), color=line.get_color(), alpha=0.2)
        data = [r.get("data_returns") for runs in algos.values() for r in runs if r.get("data_returns")]
        if data:
            d_lo, d_hi = min(d["min"] for d in data), max(d["max"] for d in data)
            ax.axhspan(d_lo, d_hi, color="tab:gray", alpha=0.15, label="data's episode returns")
            lo.append(d_lo)
            hi.append(d_hi)
        ax.plot([min(lo), max(hi)], [min(lo), max(hi)], "k--", lw=1, label="achieved = target")
        ax.set(
            xlabel="target return",
            ylabel="achieved return (last.ckpt)",
            title=f"{env} {dataset} (mean over runs, band: {CI_METHOD})",
        )
        ax.legend(fontsize=7, loc="upper left")
        lc.set(
            xlabel="training step",
            ylabel="normalized score (in training, headline target)",
            title=f"learning curve (band: {CI_METHOD})",
        )
        lc.legend(fontsize=7)
        if online:
            axes[2].set(
                xlabel="online env steps (mean over runs)",
                ylabel="normalized score (in training, headline target)",
                title="online finetuning, from the end of pretraining",
            )
            axes[2].legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{env}-{dataset}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def _short(key: str, fp: tuple, setups: dict) -> str:
    """A setup or protocol value for a figure's legend."""
    value = fp[0][PROTOCOL_FIELDS.index(key)] if key in PROTOCOL_FIELDS else setups[fp][1].get(key, "-")
    return f"{value:g}" if isinstance(value, float) else str(value)


def _learning_curve(runs: Sequence[dict]) -> tuple[list[int], np.ndarray] | None:
    """(steps, (runs, steps) normalized scores at the headline target), over the steps every run has."""
    key = f"eval/{headline_target(runs[0]):g}/normalized_score"
    series = [{h["step"]: h[key] for h in r.get("history", []) if key in h} for r in runs]
    steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
    if not steps:
        return None
    return steps, np.array([[s[t] for t in steps] for s in series])


def _online_curve(runs: Sequence[dict]) -> tuple[np.ndarray, np.ndarray] | None:
    """(online env steps, (runs, evaluations) normalized scores at the headline target) from
    the end of pretraining on, over the evaluation steps every run has; the env steps of an
    evaluation (those its weights were trained on) averaged over runs, as they differ by run.
    None unless the runs collected (the offline-only control never does)."""
    key = f"eval/{headline_target(runs[0]):g}/normalized_score"
    series = []
    for r in runs:
        start = ((r.get("config") or {}).get("online") or {}).get("pretrain_steps")
        entries = [h for h in r.get("history", []) if key in h and "online/env_steps" in h]
        series.append({h["step"]: h for h in entries if start is not None and h["step"] >= start})
    steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
    if not steps or not any(s[steps[-1]]["online/env_steps"] > 0 for s in series):
        return None
    env_steps = np.array([[s[t]["online/env_steps"] for t in steps] for s in series]).mean(0)
    return env_steps, np.array([[s[t][key] for t in steps] for s in series])


def log_to_wandb(report: dict, figures: Sequence[Path], project: str, out: Path) -> None:
    """One W&B run (offline without credentials, like training's) with the tables and figures."""
    import wandb

    from dtlab.tracking import has_credentials

    mode = None if os.environ.get("WANDB_MODE") or has_credentials() else "offline"
    run = wandb.init(project=project, job_type="report", dir=str(out), mode=mode, config={"runs": report["runs"]})
    columns = [
        "env",
        "dataset",
        "algo",
        "checkpoint",
        "target",
        "runs",
        "mean",
        "std",
        "ci_low",
        "ci_high",
        "ci_method",
    ]
    table = [[g["protocol"]["env"], *(g[c] for c in columns[1:])] for g in report["groups"]]
    run.log(
        {
            "report/groups": wandb.Table(columns=columns, data=table),
            "report/aggregates": wandb.Table(
                columns=["algo", "tasks", "runs", "iqm", "ci_low", "ci_high", "ci_method"],
                data=[
                    [a[k] for k in ("algo", "tasks", "runs", "iqm", "ci_low", "ci_high", "ci_method")]
                    for a in report["aggregates"]
                ],
            ),
            **{f"report/{p.stem}": wandb.Image(str(p)) for p in figures},
        }
    )
    run.finish()


def report(args: argparse.Namespace) -> dict:
    records, not_used = find_runs(args.dirs)
    if args.records:
        written = write_records(records, Path(args.records))
        print(f"wrote {len(written)} run records into {args.records}")
    out = Path(args.out) if args.out else Path(args.dirs[0]) / "report"
    out.mkdir(parents=True, exist_ok=True)
    result = build_report(records, not_used)
    figures = plot_figures(records, out)
    (out / "report.json").write_text(json.dumps(result, indent=1))
    (out / "report.md").write_text(to_markdown(result))
    (out / "report.tex").write_text(to_latex(result))
    if args.wandb:
        log_to_wandb(result, figures, args.wandb_project, out)
    print(to_markdown(result))
    print(f"wrote {out / 'report.md'}, report.tex, report.json and {len(figures)} figures")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dtlab-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="run dirs, multirun sweep dirs, or folders of run records")
    parser.add_argument("--out", help="where report.md, report.tex, report.json and figures go (default: DIR/report)")
    parser.add_argument("--records", help="also write each run's compact record (a few KB) into this folder")
    parser.add_argument("--wandb", action="store_true", help="log the tables and figures to one W&B run")
    parser.add_argument("--wandb-project", default="dtlab", help="W&B project for --wandb")
    args = parser.parse_args(argv)
    run_cli(report, args)


if __name__ == "__main__":
    main(sys.argv[1:])
