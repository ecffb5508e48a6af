"""From runs to a paper table: `python -m dtlab.report DIR [DIR ...] [--out DIR] [--records DIR]`.

Finds every training run under the dirs (single runs, multirun sweeps, committed run
records), each once (by its run id: dtlab.runs), groups the scores by env, dataset,
algorithm, checkpoint and target, never pooling runs whose protocols or training setups
differ (dtlab.groups), with the statistics of dtlab.stats: per group the mean over runs with
its 95% Student-t CI; across tasks the IQM with a 95% stratified-bootstrap CI and the
probability of improvement (Agarwal et al. 2021, rliable); return calibration per run. The
headline score of a group is at a target fixed before the run: the highest of its fixed
targets (`target_return.values`: in every preset the env's highest paper target, e.g. 12000
for HalfCheetah; the sample's expert mean for the default run), never a max over achieved
scores; a run with no fixed target has no headline, and is listed with every run not used.

Writes report.md, report.tex, report.json and figures into --out (default: DIR/report)
(dtlab.render).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from dtlab.cli import run_cli
from dtlab.groups import build_report, setup
from dtlab.render import learning_curve, log_to_wandb, plot_figures, to_latex, to_markdown
from dtlab.runs import find_runs, headline_target, to_record, write_records
from dtlab.stats import bootstrap_ci, calibration, iqm, mean_ci, probability_of_improvement, slope, spearman, t_quantile

# The names this module held before dtlab.stats, runs, groups and render took them over, so
# that code importing them from here keeps working
__all__ = [
    "bootstrap_ci",
    "build_report",
    "calibration",
    "find_runs",
    "headline_target",
    "iqm",
    "learning_curve",
    "main",
    "mean_ci",
    "plot_figures",
    "probability_of_improvement",
    "setup",
    "slope",
    "spearman",
    "t_quantile",
    "to_markdown",
    "to_record",
]
_online_curve = functools.partial(learning_curve, online=True)  # its name before: tests/test_odt.py reads it


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
