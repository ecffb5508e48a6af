"""From runs to a paper table: `python -m dtlab.report DIR [DIR ...] [--out DIR] [--records DIR]`.

Finds every training run under the dirs (single runs, multirun sweeps, committed run
records), reads each run's final evaluation with its protocol record and config, and groups
the scores by env, dataset, algorithm, checkpoint and target. Runs whose protocols differ
(env version or horizon, episodes, seeds, library versions) are never pooled.

Statistics follow Agarwal et al. 2021 ("Deep RL at the Edge of the Statistical Precipice",
the rliable library): per group the mean over runs with a 95% percentile-bootstrap CI; across
tasks the interquartile mean (IQM) of all runs' scores with a 95% stratified-bootstrap CI
(runs resampled within each task) and the probability of improvement of one algorithm over
another. Return calibration per run: the Spearman rank correlation of achieved against target
return over all final targets, and the least-squares slope over the targets within the data's
return range. The headline score of a group is at a target fixed before the run: the highest
of its fixed targets (`target_return.values`: in every preset the env's highest paper target,
e.g. 12000 for HalfCheetah; the sample's expert mean for the default run), else the env's
highest paper target, never a max over achieved scores.

Writes report.md, report.tex, report.json and figures into --out (default: DIR/report).
"""

from __future__ import annotations

import argparse
import json
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

BOOTSTRAP_REPS = 10_000
CI = 0.95


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


def mean_ci(scores: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap CI of a mean over runs: bootstrap_ci for one task and the
    mean, vectorized (the report computes one for every group and every figure point)."""
    x = np.asarray(scores, dtype=np.float64)
    means = x[np.random.default_rng(seed).integers(0, len(x), (BOOTSTRAP_REPS, len(x)))].mean(axis=1)
    alpha = (1 - CI) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


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
    if target.endswith("load_local"):
        paths = dataset.get("path")
        if paths is None:
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


def to_record(final: dict, run: str) -> dict:
    """A run's compact record (a few KB): what the report needs, without the episodes."""
    config = final.get("config") or {}
    env = config.get("env", {})
    return {
        "kind": "run_record",
        "run": run,
        "env_id": env.get("id"),
        "dataset": dataset_label(config.get("dataset", {})),
        "algo": (config.get("algo") or {}).get("name", "dt"),
        "seed": config.get("seed"),
        # a target the run was evaluated at: a default run on the sample asks for its own two
        "headline_target": max(
            (config.get("target_return") or {}).get("values") or env.get("target_returns") or [float("nan")]
        ),
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


def find_runs(dirs: Iterable[str | Path]) -> tuple[list[dict], list[dict]]:
    """(records, incomplete): a record per finished run under the dirs (run dirs with a final
    evaluation, and committed `*.json` run records), and {run, reason} for every run that
    could not be used."""
    records, incomplete = {}, []
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
                incomplete.append(
                    {"run": name, "reason": "no final_evaluation.json (unfinished, or eval.final_episodes=0)"}
                )
                continue
            try:
                data = json.loads(final.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                incomplete.append({"run": name, "reason": f"final_evaluation.json is not JSON ({e})"})
                continue
            if "config" not in data or not data.get("checkpoints"):
                incomplete.append({"run": name, "reason": "final_evaluation.json lacks its config or checkpoints"})
                continue
            records[name] = to_record(data, name)
        for path in sorted(root.rglob("*.json")):
            if ".hydra" in path.parts or path.name in ("final_evaluation.json", "report.json"):
                continue
            try:
                data = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(data, dict) and data.get("kind") == "run_record":
                records.setdefault(data["run"], data)
    return list(records.values()), incomplete


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


def fingerprint(protocol: dict, config: dict) -> tuple:
    """What must be equal for two scores to be pooled: the evaluation protocol, then the
    training setup (a run's algorithm name alone does not say its budget, size or data share)."""
    v = protocol["versions"]
    model, data, trainer = config.get("model", {}), config.get("data", {}), config.get("trainer", {})
    online = config.get("online")  # algo=odt: its rounds, trajectories and steps a round, buffer
    return (
        protocol["env_id"],
        protocol["max_episode_steps"],
        protocol["episodes_per_target"],
        tuple(protocol["seeds"]),
        v.get("gymnasium"),
        v.get("mujoco"),
        model.get("policy", "dt"),
        model.get("context_length"),
        model.get("n_layer"),
        model.get("n_embd"),
        model.get("learning_rate"),
        trainer.get("max_steps"),
        data.get("top_fraction", 1.0),
        online and "x".join(str(online.get(k)) for k in ONLINE_SETUP),
    )


ONLINE_SETUP = ("rounds", "trajectories_per_round", "updates_per_round", "buffer_size")
FINGERPRINT_FIELDS = ("env", "horizon", "episodes", "seeds", "gymnasium", "mujoco")  # the protocol
SETUP_FIELDS = ("policy", "K", "n_layer", "n_embd", "lr", "max_steps", "top_fraction", "online")  # the training
PROTOCOL = len(FINGERPRINT_FIELDS)


def differences(prints: Sequence[tuple]) -> str:
    """Which protocol fields differ between groups that would otherwise pool."""
    names = [n for i, n in enumerate(FINGERPRINT_FIELDS + SETUP_FIELDS) if len({p[i] for p in prints}) > 1]
    return ", ".join(names)


def normalized(returns: float, ref: Sequence[float]) -> float:
    return 100.0 * (returns - ref[0]) / (ref[1] - ref[0])


def build_report(records: Sequence[dict], incomplete: Sequence[dict]) -> dict:
    cells = defaultdict(list)  # (env, dataset, algo, checkpoint, target, fingerprint) -> per-run dicts
    for r in records:
        for checkpoint, c in r["checkpoints"].items():
            data = r.get("data_returns")
            cal = calibration(c["summary"], (data["min"], data["max"]) if data else None)
            for s in c["summary"]:
                fp = fingerprint(c["protocol"], r.get("config", {}))
                key = (r["env_id"], r["dataset"], r["algo"], checkpoint, s["target"], fp)
                cells[key].append({"record": r, "summary": s, "calibration": cal, "protocol": c["protocol"]})
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
                "headline": math.isclose(target, first["headline_target"]),
                "runs": len(runs),
                "seeds": sorted(run["record"]["seed"] for run in runs),
                "scores": scores.tolist(),
                "mean": float(scores.mean()),
                "std": float(scores.std(ddof=1)) if len(scores) > 1 else 0.0,
                "ci_low": low,
                "ci_high": high,
                "calibration": {
                    "spearman": float(np.mean(spearmans)) if spearmans else None,
                    "slope": float(np.mean(slopes)) if slopes else None,
                },
                "behaviour": normalized(data["mean"], first["ref_scores"]) if "mean" in data else None,
                "episodes": runs[0]["summary"]["episodes"],
                "steps": sorted({run["record"]["steps"] for run in runs}),
                "wall_time_min": float(np.mean([run["record"]["wall_time_s"] or 0 for run in runs]) / 60),
                "protocol": dict(zip(FINGERPRINT_FIELDS, fp[:PROTOCOL], strict=True)),
                "setup": dict(zip(SETUP_FIELDS, fp[PROTOCOL:], strict=True)),
                "protocol_differs": differences(sorted(others, key=str)) if len(others) > 1 else "",
                "target_rule": runs[0]["protocol"]["target_rule"],
            }
        )
    return {
        "groups": groups,
        "aggregates": aggregates(cells),
        "improvement": improvements(cells),
        "incomplete": list(incomplete),
        "runs": len(records),
        "wall_time_min_total": float(sum((r.get("wall_time_s") or 0) for r in records) / 60),
    }


ALGO_ORDER = {"dt": 0, "odt": 1, "odt_offline": 2, "bc": 3, "pct_bc": 4}


def _order(item: tuple) -> tuple:
    """Rows by env, dataset, algorithm (DT first, then its baselines), last before best, target."""
    env, dataset, algo, checkpoint, target, fp = item[0]
    return (env, dataset, ALGO_ORDER.get(algo, 9), algo, checkpoint != "last", target, str(fp))


def _headline_tasks(cells: dict) -> dict[str, dict[tuple, np.ndarray]]:
    """algo -> {(env, dataset): scores of its runs} at the headline target, last.ckpt. Every
    algorithm's runs of a task are taken under one protocol, the one most runs of the task
    share (so that no comparison mixes protocols), and under the setup most of its runs of
    that protocol share; both choices count runs, never look at scores."""
    headline = {
        key: runs
        for key, runs in cells.items()
        if key[3] == "last" and math.isclose(key[4], runs[0]["record"]["headline_target"])
    }
    counts = defaultdict(lambda: defaultdict(int))  # task -> protocol -> runs
    for (env, dataset, _algo, _ckpt, _target, fp), runs in headline.items():
        counts[(env, dataset)][fp[:PROTOCOL]] += len(runs)
    protocol = {task: max(sorted(c, key=str), key=lambda p: c[p]) for task, c in counts.items()}
    per_algo = defaultdict(lambda: defaultdict(list))
    for (env, dataset, algo, _ckpt, _target, fp), runs in sorted(headline.items(), key=lambda kv: str(kv[0])):
        if fp[:PROTOCOL] == protocol[(env, dataset)]:
            per_algo[algo][(env, dataset)].append([run["summary"]["normalized_score"] for run in runs])
    return {
        algo: {task: np.array(max(entries, key=len)) for task, entries in tasks.items()}
        for algo, tasks in per_algo.items()
    }


def aggregates(cells: dict) -> list[dict]:
    out = []
    for algo, tasks in sorted(_headline_tasks(cells).items()):
        scores = list(tasks.values())
        low, high = bootstrap_ci(scores, lambda t: iqm(np.concatenate(t)))
        out.append(
            {
                "algo": algo,
                "tasks": len(tasks),
                "runs": int(sum(len(s) for s in scores)),
                "iqm": iqm(np.concatenate(scores)),
                "ci_low": low,
                "ci_high": high,
            }
        )
    return out


def improvements(cells: dict) -> list[dict]:
    """P(X > Y) for every ordered pair of algorithms, over the tasks both have."""
    tasks = _headline_tasks(cells)
    out = []
    for x in sorted(tasks):
        for y in sorted(tasks):
            common = sorted(set(tasks[x]) & set(tasks[y]))
            if x == y or not common:
                continue
            xs, ys = [tasks[x][t] for t in common], [tasks[y][t] for t in common]
            k = len(xs)
            low, high = bootstrap_ci(xs + ys, lambda t, k=k: probability_of_improvement(t[:k], t[k:]))
            value = probability_of_improvement(xs, ys)
            out.append({"x": x, "y": y, "tasks": k, "probability": value, "ci_low": low, "ci_high": high})
    return out


# ---------------------------------------------------------------------------------------------
# Writing it out.


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def headline_rows(report: dict) -> list[dict]:
    return [g for g in report["groups"] if g["headline"]]


def protocol_line(report: dict) -> str:
    groups = report["groups"]
    if not groups:
        return "No finished runs."
    p = groups[0]["protocol"]
    seeds = sorted({g["protocol"]["seeds"] for g in groups})
    episodes = sorted({g["episodes"] for g in groups})
    return (
        f"Protocol: final evaluation after training, on env seeds {', '.join(f'{a}-{b}' for a, b in seeds)} (the "
        f"reporting range: no in-training evaluation used them, so no number here was selected on the episodes "
        f"that report it), {', '.join(map(str, episodes))} episodes per target; score = D4RL-normalized return, "
        f"mean over runs (seeds) with a 95% bootstrap CI over runs; headline target = the highest target fixed "
        f"before the runs (in the presets, the env's highest paper target); calibration = Spearman rank "
        f"correlation of achieved against target return "
        f"over all final targets, and the least-squares slope within the data's return range (1 = the return "
        f"follows the target). gymnasium {p['gymnasium']}, mujoco {p['mujoco']}."
    )


ALGO_NAMES = {"dt": "DT", "bc": "BC", "pct_bc": "10%BC", "odt": "ODT", "odt_offline": "ODT offline-only"}


def paper_table(report: dict) -> list[str]:
    """The DT paper's layout (its Tables 2 and 3): a row per dataset, the behaviour policy's
    score and each algorithm's last.ckpt score at the headline target, mean [95% CI] over runs,
    with DT's calibration. Where a cell has runs under more than one protocol, the one with most
    runs (as for the aggregates)."""
    cells: dict[tuple, dict] = {}
    for g in headline_rows(report):
        key = (g["protocol"]["env"], g["dataset"], g["algo"])
        if g["checkpoint"] == "last" and (key not in cells or g["runs"] > cells[key]["runs"]):
            cells[key] = g
    algos = sorted({a for _, _, a in cells}, key=lambda a: (ALGO_ORDER.get(a, 9), a))
    tasks = sorted({(e, d) for e, d, _ in cells})
    lines = [
        "| env | dataset | behaviour | "
        + " | ".join(ALGO_NAMES.get(a, a) for a in algos)
        + " | DT Spearman | DT slope |",
        "| --- | --- | --- | " + " | ".join("---" for _ in algos) + " | --- | --- |",
    ]
    for env, dataset in tasks:
        row = [cells.get((env, dataset, a)) for a in algos]
        behaviour = next(g["behaviour"] for g in row if g)
        scores = [f"{g['mean']:.1f} [{g['ci_low']:.1f}, {g['ci_high']:.1f}] ({g['runs']})" if g else "-" for g in row]
        dt = cells.get((env, dataset, "dt"))
        cal = dt["calibration"] if dt else {"spearman": None, "slope": None}
        lines.append(
            f"| {env} | {dataset} | {_fmt(behaviour)} | {' | '.join(scores)} "
            f"| {_fmt(cal['spearman'], 2)} | {_fmt(cal['slope'], 2)} |"
        )
    return lines


def to_markdown(report: dict) -> str:
    lines = paper_table(report) + [
        "",
        "Each cell: last.ckpt at the headline target, mean [95% CI] (runs). Every checkpoint and algorithm:",
        "",
        "| env | dataset | behaviour | algo | ckpt | target | runs | score (mean +- std) | 95% CI | Spearman | slope "
        "| steps | wall min |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for g in headline_rows(report):
        note = f" ({g['protocol_differs']} differ)" if g["protocol_differs"] else ""
        lines.append(
            f"| {g['protocol']['env']} | {g['dataset']}{note} | {_fmt(g['behaviour'])} | {g['algo']} "
            f"| {g['checkpoint']} "
            f"| {g['target']:g} | {g['runs']} | {g['mean']:.1f} +- {g['std']:.1f} | [{g['ci_low']:.1f}, "
            f"{g['ci_high']:.1f}] | {_fmt(g['calibration']['spearman'], 2)} | {_fmt(g['calibration']['slope'], 2)} "
            f"| {'/'.join(map(str, g['steps']))} | {g['wall_time_min']:.1f} |"
        )
    lines += ["", protocol_line(report), ""]
    if report["aggregates"]:
        lines += ["| algo | tasks | runs | IQM | 95% CI (stratified bootstrap) |", "| --- | --- | --- | --- | --- |"]
        lines += [
            f"| {a['algo']} | {a['tasks']} | {a['runs']} | {a['iqm']:.1f} | [{a['ci_low']:.1f}, {a['ci_high']:.1f}] |"
            for a in report["aggregates"]
        ]
        lines.append("")
    for p in report["improvement"]:
        lines.append(
            f"- P({p['x']} > {p['y']}) = {p['probability']:.2f} [{p['ci_low']:.2f}, {p['ci_high']:.2f}] "
            f"over {p['tasks']} tasks"
        )
    if report["incomplete"]:
        lines += ["", "Not used:"] + [f"- {i['run']}: {i['reason']}" for i in report["incomplete"]]
    lines.append(f"\n{report['runs']} runs, {report['wall_time_min_total']:.0f} min of training and evaluation in all.")
    return "\n".join(lines) + "\n"


def to_latex(report: dict) -> str:
    rows = [
        f"{g['protocol']['env']} & {g['dataset']} & {g['algo']} & {g['checkpoint']} & {g['target']:g} & {g['runs']} & "
        f"${g['mean']:.1f} \\pm {g['std']:.1f}$ & [{g['ci_low']:.1f}, {g['ci_high']:.1f}] & "
        f"{_fmt(g['calibration']['spearman'], 2)} \\\\"
        for g in headline_rows(report)
    ]
    body = "\n".join(rows).replace("_", r"\_")
    return (
        "\\begin{tabular}{lllllrlll}\n\\toprule\n"
        "env & dataset & algo & ckpt & target & runs & score & 95\\% CI & Spearman \\\\\n\\midrule\n"
        f"{body}\n\\bottomrule\n\\end{{tabular}}\n"
    )


def plot_figures(records: Sequence[dict], out: Path) -> list[Path]:
    """Per dataset: every algorithm's return-conditioning curve (mean over runs, 95% bootstrap
    band, the diagonal, the data's range shaded), and its learning curve at the headline target;
    where runs finetuned online, a third panel: that curve against online env steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_task = defaultdict(lambda: defaultdict(list))  # runs of other protocols get curves of their own
    for r in records:
        if "last" in r["checkpoints"]:
            p, fp = r["checkpoints"]["last"]["protocol"], fingerprint(r["checkpoints"]["last"]["protocol"], r["config"])
            setup = dict(zip(SETUP_FIELDS, fp[PROTOCOL:], strict=True))
            label = f"{r['algo']} (K={setup['K']}, {setup['max_steps']} steps, {p['episodes_per_target']} ep.)"
            by_task[(r["env_id"], r["dataset"])][label].append(r)
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
            band = np.array([mean_ci(col) for col in per_run.T])
            (line,) = ax.plot(targets, mean, "o-", label=f"{algo} ({len(runs)} runs)")
            ax.fill_between(targets, band[:, 0], band[:, 1], color=line.get_color(), alpha=0.2)
            lo += [min(targets), float(band.min())]
            hi += [max(targets), float(band.max())]
            curve = _learning_curve(runs)
            if curve:
                steps, values = curve
                lc.plot(steps, values.mean(0), "o-", color=line.get_color(), label=algo)
                if len(values) > 1:
                    b = np.array([mean_ci(col) for col in values.T])
                    lc.fill_between(steps, b[:, 0], b[:, 1], color=line.get_color(), alpha=0.2)
            curve = _online_curve(runs) if online else None
            if curve:
                env_steps, values = curve
                axes[2].plot(env_steps, values.mean(0), "o-", color=line.get_color(), label=algo)
                if len(values) > 1:
                    b = np.array([mean_ci(col) for col in values.T])
                    axes[2].fill_between(env_steps, b[:, 0], b[:, 1], color=line.get_color(), alpha=0.2)
        data = [r.get("data_returns") for runs in algos.values() for r in runs if r.get("data_returns")]
        if data:
            d_lo, d_hi = min(d["min"] for d in data), max(d["max"] for d in data)
            ax.axhspan(d_lo, d_hi, color="tab:gray", alpha=0.15, label="data's episode returns")
            lo.append(d_lo)
            hi.append(d_hi)
        ax.plot([min(lo), max(hi)], [min(lo), max(hi)], "k--", lw=1, label="achieved = target")
        ax.set(xlabel="target return", ylabel="achieved return (last.ckpt)", title=f"{env} {dataset}")
        ax.legend(fontsize=7, loc="upper left")
        lc.set(xlabel="training step", ylabel="normalized score (in training, headline target)", title="learning curve")
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


def _learning_curve(runs: Sequence[dict]) -> tuple[list[int], np.ndarray] | None:
    """(steps, (runs, steps) normalized scores at the headline target), over the steps every run has."""
    key = f"eval/{runs[0]['headline_target']:g}/normalized_score"
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
    key = f"eval/{runs[0]['headline_target']:g}/normalized_score"
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
    columns = ["env", "dataset", "algo", "checkpoint", "target", "runs", "mean", "std", "ci_low", "ci_high"]
    table = [[g["protocol"]["env"], *(g[c] for c in columns[1:])] for g in report["groups"]]
    run.log(
        {
            "report/groups": wandb.Table(columns=columns, data=table),
            "report/aggregates": wandb.Table(
                columns=["algo", "tasks", "runs", "iqm", "ci_low", "ci_high"],
                data=[
                    [a[k] for k in ("algo", "tasks", "runs", "iqm", "ci_low", "ci_high")] for a in report["aggregates"]
                ],
            ),
            **{f"report/{p.stem}": wandb.Image(str(p)) for p in figures},
        }
    )
    run.finish()


def report(args: argparse.Namespace) -> dict:
    records, incomplete = find_runs(args.dirs)
    if args.records:
        written = write_records(records, Path(args.records))
        print(f"wrote {len(written)} run records into {args.records}")
    out = Path(args.out) if args.out else Path(args.dirs[0]) / "report"
    out.mkdir(parents=True, exist_ok=True)
    result = build_report(records, incomplete)
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
