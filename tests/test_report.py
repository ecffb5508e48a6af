"""dtlab.report on fabricated run dirs with known numbers, and its statistics against rliable."""

import json
from pathlib import Path

import numpy as np
import pytest

from dtlab.report import build_report, find_runs, iqm, main, probability_of_improvement, slope, spearman, to_record

HALFCHEETAH = {
    "id": "HalfCheetah-v5",
    "max_episode_steps": 1000,
    "ref_min_score": -280.178953,
    "ref_max_score": 12135.0,
    "target_returns": [6000, 12000],
}


def ret(score: float) -> float:
    """The raw return of a normalized score on HalfCheetah."""
    return score / 100 * (12135.0 + 280.178953) - 280.178953


def protocol(seeds=(10000, 10019), episodes=10, env_id="HalfCheetah-v5") -> dict:
    return {
        "env_id": env_id,
        "max_episode_steps": 1000,
        "seeds": list(seeds),
        "seeds_role": "reporting",
        "episodes_per_target": episodes,
        "targets": [6000.0, 12000.0],
        "target_rule": {"values": [6000, 12000], "quantiles": [], "max_multiples": [], "final_sweep_points": 0},
        "checkpoint": "last.ckpt",
        "step": 100,
        "versions": {"dtlab": "0.2.0", "gymnasium": "1.4.0", "mujoco": "4.0.0"},
    }


def make_run(
    root: Path,
    name: str,
    data: str,
    seed: int,
    scores: dict,
    algo: str = "dt",
    setup: dict | None = None,
    **protocol_args,
) -> Path:
    """A run dir as dtlab.train leaves it: .hydra/config.yaml and final_evaluation.json with
    normalized `scores` per target ({6000: s, 12000: s}) for last.ckpt."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("trainer:\n  max_steps: 100\n")
    episodes = protocol_args.get("episodes", 10)
    summary = [
        {"target": float(t), "return_mean": ret(s), "return_std": 1.0, "normalized_score": s, "episodes": episodes}
        for t, s in scores.items()
    ]
    final = {
        "kind": "final_evaluation",
        "checkpoints": {"last": {"protocol": protocol(**protocol_args), "episodes": [], "summary": summary}},
        "steps": 100,
        "wall_time_s": 60.0,
        "data_returns": {"min": -300.0, "max": 5000.0, "mean": ret(35.0)},
        "history": [
            {"step": 50, "eval/12000/normalized_score": 10.0 + seed},
            {"step": 100, "eval/12000/normalized_score": 20.0},
        ],
        "config": {
            "env": HALFCHEETAH,
            "dataset": {"_target_": "dtlab.data.load_local", "path": f"/data/{data}.parquet"},
            "seed": seed,
            **({"algo": {"name": algo}} if algo != "dt" else {}),
            **(setup or {}),
        },
    }
    (run / "final_evaluation.json").write_text(json.dumps(final))
    return run


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    for seed, s in enumerate([40.0, 42.0, 44.0]):
        make_run(root, f"medium-{seed}", "halfcheetah-medium-v5", seed, {6000: s - 5, 12000: s})
    for seed, s in enumerate([30.0, 33.0, 36.0]):
        make_run(root, f"bc-medium-{seed}", "halfcheetah-medium-v5", seed, {6000: s, 12000: s}, algo="bc")
    # unfinished: a run dir without its final evaluation
    (root / "killed" / ".hydra").mkdir(parents=True)
    (root / "killed" / ".hydra" / "config.yaml").write_text("trainer:\n  max_steps: 100\n")
    # same dataset and algorithm, but 5 episodes per target: another protocol
    make_run(root, "medium-5ep", "halfcheetah-medium-v5", 9, {6000: 0.0, 12000: 90.0}, episodes=5)
    # same protocol, but trained on the top 10% only: another setup, never pooled with the DT runs
    make_run(
        root, "medium-top", "halfcheetah-medium-v5", 8, {6000: 0.0, 12000: 70.0}, setup={"data": {"top_fraction": 0.1}}
    )
    return root


def group(report: dict, **where) -> list[dict]:
    return [g for g in report["groups"] if all(g[k] == v for k, v in where.items())]


def test_the_report_gives_the_known_table(sweep, tmp_path):
    out = tmp_path / "out"
    main([str(sweep), "--out", str(out), "--records", str(tmp_path / "records")])
    report = json.loads((out / "report.json").read_text())
    (dt,) = group(report, algo="dt", target=12000.0, checkpoint="last", runs=3)
    assert dt["scores"] == [40.0, 42.0, 44.0] and dt["mean"] == pytest.approx(42.0) and dt["std"] == pytest.approx(2.0)
    assert 40.0 <= dt["ci_low"] < 42.0 < dt["ci_high"] <= 44.0 and dt["headline"]
    assert dt["env"] == "HalfCheetah-v5" and dt["dataset"] == "halfcheetah-medium-v5"
    assert dt["behaviour"] == pytest.approx(35.0)
    (bc,) = group(report, algo="bc", target=12000.0)
    assert bc["mean"] == pytest.approx(33.0) and bc["calibration"]["spearman"] is None  # flat by construction
    # incomplete runs are listed with the reason
    assert [i["run"] for i in report["incomplete"]] == ["sweep/killed"]
    # the 5-episode run is not pooled with the 10-episode ones, and the difference is named
    (other,) = group(report, algo="dt", target=12000.0, mean=90.0)
    assert other["scores"] == [90.0] and other["protocol_differs"] == dt["protocol_differs"] == "episodes, top_fraction"
    assert (other["protocol"]["episodes"], other["episodes"], dt["protocol"]["episodes"]) == (5, 5, 10)
    (top,) = group(report, algo="dt", target=12000.0, mean=70.0)
    assert top["runs"] == 1 and top["setup"]["top_fraction"] == 0.1 and "top_fraction" in top["protocol_differs"]
    # the aggregate takes one protocol per task (the one with most runs): 3 runs each, P(dt > bc) = 1
    (agg_dt,) = [a for a in report["aggregates"] if a["algo"] == "dt"]
    assert agg_dt["runs"] == 3 and agg_dt["iqm"] == pytest.approx(42.0)
    (p,) = [p for p in report["improvement"] if (p["x"], p["y"]) == ("dt", "bc")]
    assert p["probability"] == 1.0
    markdown = (out / "report.md").read_text()
    assert "| HalfCheetah-v5 | halfcheetah-medium-v5 (episodes, top_fraction differ) | 35.0 | dt |" in markdown
    assert "42.0 +- 2.0" in markdown and "no number here was selected" in markdown
    # the paper's layout: one row per dataset, each algorithm's cell under the protocol most runs share
    assert markdown.startswith("| env | dataset | behaviour | DT | BC | DT Spearman | DT slope |\n")
    ci = f"[{dt['ci_low']:.1f}, {dt['ci_high']:.1f}]"
    row = f"| HalfCheetah-v5 | halfcheetah-medium-v5 | 35.0 | 42.0 {ci} (3) | 33.0 ["
    assert row in markdown
    assert (out / "report.tex").read_text().startswith("\\begin{tabular}")
    assert (out / "HalfCheetah-v5-halfcheetah-medium-v5.png").stat().st_size > 10_000
    # the committed records alone give the same report
    records, incomplete = find_runs([tmp_path / "records"])
    again = build_report(records, [])
    assert [g["scores"] for g in again["groups"]] == [g["scores"] for g in report["groups"]]
    assert len(records) == 8 and sum(p.stat().st_size for p in (tmp_path / "records").glob("*.json")) < 8 * 8000


def test_spearman_and_slope_on_known_inputs():
    targets = [0.0, 1000.0, 2000.0, 3000.0, 4000.0]
    assert spearman(targets, [0.5 * t + 100 for t in targets]) == pytest.approx(1.0)
    assert slope(targets, [0.5 * t + 100 for t in targets]) == pytest.approx(0.5)
    assert spearman(targets, [5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman(targets, [1, 2, 2, 3, 4]) == pytest.approx(0.9746794344808963)  # ties: average ranks
    assert spearman(targets, [7, 7, 7, 7, 7]) is None and slope([1.0, 1.0], [2.0, 3.0]) is None


def test_statistics_agree_with_rliable():
    rliable_metrics = pytest.importorskip("rliable.metrics")
    rliable_library = pytest.importorskip("rliable.library")
    from dtlab.report import bootstrap_ci, mean_ci

    rng = np.random.default_rng(0)
    scores = {algo: rng.normal(loc, 10, size=(5, 3)) for algo, loc in (("dt", 50.0), ("bc", 45.0))}  # runs x tasks
    for x in scores.values():
        assert iqm(x) == pytest.approx(rliable_metrics.aggregate_iqm(x), abs=1e-9)
    assert probability_of_improvement(list(scores["dt"].T), list(scores["bc"].T)) == pytest.approx(
        rliable_metrics.probability_of_improvement(scores["dt"], scores["bc"]), abs=1e-12
    )
    _, theirs = rliable_library.get_interval_estimates(
        {"dt": scores["dt"]},
        lambda x: np.array([rliable_metrics.aggregate_iqm(x)]),
        reps=10_000,
        random_state=np.random.RandomState(0),
    )
    ours = bootstrap_ci(list(scores["dt"].T), lambda t: iqm(np.concatenate(t)))
    # the vectorized mean CI is the same bootstrap as the loop, for one task
    one = scores["dt"][:, 0]
    np.testing.assert_allclose(mean_ci(one), bootstrap_ci([one], lambda t: float(t[0].mean())), atol=0.5)
    # Both are 10,000-replicate percentile bootstraps of the same statistic, resampling runs
    # within each task, with different random draws: they agree up to Monte Carlo error. The
    # standard error of a 2.5% / 97.5% bootstrap quantile at 10k replicates is ~2% of the
    # bootstrap distribution's spread (here ~4 points wide), so 0.5 points is ~4 standard errors.
    np.testing.assert_allclose(ours, theirs["dt"][:, 0], atol=0.5)


def test_the_headline_target_is_one_the_run_was_evaluated_at():
    """The highest of the run's fixed targets (a default run on the sample asks for 4074 and
    11544, not the env's 6000 and 12000), else the env's highest paper target."""
    final = {"checkpoints": {}, "config": {"env": HALFCHEETAH, "target_return": {"values": [4074, 11544]}}}
    assert to_record(final, "sample")["headline_target"] == 11544
    final["config"]["target_return"] = {"values": [], "quantiles": [0.5, 1.0]}
    assert to_record(final, "quantiles")["headline_target"] == 12000


def test_the_readme_results_are_the_committed_records_report():
    """The README's tables are report.md of the committed run records, as their commands say:
    regenerating them from benchmarks/results/runs/ gives the same text."""
    from dtlab.report import to_markdown

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    runs = root / "benchmarks" / "results" / "runs"
    tables = [("paper-table", ["halfcheetah", "hopper-walker2d", "baselines"], 90), ("odt", ["odt"], 6)]
    for name, dirs, count in tables:
        start, end = f"<!-- report:{name} -->\n", f"<!-- /report:{name} -->"
        committed = readme[readme.index(start) + len(start) : readme.index(end)]
        records, incomplete = find_runs([runs / d for d in dirs])
        assert len(records) == count and not incomplete, name
        assert to_markdown(build_report(records, incomplete)) == committed, name


def test_the_report_goes_to_one_offline_wandb_run(sweep, tmp_path):
    from dtlab.tracking import read_offline_run

    out = tmp_path / "out"
    main([str(sweep), "--out", str(out), "--wandb"])
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    run = read_offline_run(run_dir)
    logged = set().union(*(row for row in run["history"]))
    assert {"report/groups", "report/aggregates", "report/HalfCheetah-v5-halfcheetah-medium-v5"} <= logged
