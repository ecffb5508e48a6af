"""The report written out: Markdown and LaTeX tables, the protocol line, figures (return
conditioning and learning curves per dataset) and one W&B run, all from `build_report`'s
dict and the run records.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dtlab.groups import (
    ALGO_ORDER,
    PROTOCOL_FIELDS,
    differences,
    not_a_result,
    protocol_key,
    setup,
    setup_hash,
)
from dtlab.runs import headline_target
from dtlab.stats import BOOTSTRAP_METHOD, BOOTSTRAP_REPS, CI_METHOD, mean_ci


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
        if "last" in r["checkpoints"] and not_a_result(r) is None:
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
        online = any(learning_curve(runs, online=True) for runs in algos.values())
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
            curve = learning_curve(runs)
            if curve:
                steps, values = curve
                lc.plot(steps, values.mean(0), "o-", color=line.get_color(), label=algo)
                if len(values) > 1:
                    lc.fill_between(steps, *mean_ci(values.T), color=line.get_color(), alpha=0.2)
            curve = learning_curve(runs, online=True) if online else None
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


ONLINE_ENV_STEPS = "online/env_steps"  # what dtlab.online's stage records with each evaluation


def learning_curve(runs: Sequence[dict], online: bool = False) -> tuple[np.ndarray | list[int], np.ndarray] | None:
    """(x, (runs, points) normalized scores at the headline target) over the evaluation steps
    every run has; None where there are none. x: the training steps; with `online`, the online
    env steps (those each evaluation's weights were trained on) averaged over runs, as they
    differ by run, from the end of pretraining on, and None unless the runs collected (the
    offline-only control never does)."""
    key = f"eval/{headline_target(runs[0]):g}/normalized_score"
    series = []
    for r in runs:
        entries = [h for h in r.get("history", []) if key in h]
        if online:
            start = ((r.get("config") or {}).get("online") or {}).get("pretrain_steps")
            entries = [h for h in entries if ONLINE_ENV_STEPS in h and start is not None and h["step"] >= start]
        series.append({h["step"]: h for h in entries})
    steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
    if not steps:
        return None
    scores = np.array([[s[t][key] for t in steps] for s in series])
    if not online:
        return steps, scores
    if not any(s[steps[-1]][ONLINE_ENV_STEPS] > 0 for s in series):
        return None
    return np.array([[s[t][ONLINE_ENV_STEPS] for t in steps] for s in series]).mean(0), scores


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
