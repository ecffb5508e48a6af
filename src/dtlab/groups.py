"""Which runs pool, and each pool's numbers: the report as data (`build_report`).

Scores are grouped by env, dataset, algorithm, checkpoint and target. Runs whose protocols
(env version or horizon, episodes, seeds, library versions, the backend, workers and threads
that ran) or training setups (the whole resolved recipe, `setup`) differ are never pooled;
the keys that keep two groups apart are named (`differences`). Every run not used is listed,
with why. The headline score of a group is at a target fixed before the run (runs.py's
`headline_target`), never a max over achieved scores; `choose_table` picks, by counting runs
and never by looking at scores, the groups of the paper table and the aggregates.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dtlab.runs import headline_target, run_id
from dtlab.stats import (
    BOOTSTRAP_METHOD,
    CI_METHOD,
    bootstrap_ci,
    calibration,
    iqm,
    mean_ci,
    normalized_score,
    probability_of_improvement,
)

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
            if not defaults.get(group):
                continue
            given = {}  # a group the record lacks is at its defaults, as a key it lacks is
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


def not_a_result(record: dict) -> str | None:
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
        reason = not_a_result(r)
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
                "behaviour": normalized_score(data["mean"], first["ref_scores"]) if "mean" in data else None,
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
