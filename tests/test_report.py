"""dtlab.report on fabricated run dirs with known numbers, and its statistics against rliable."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from dtlab.report import (
    build_report,
    find_runs,
    iqm,
    main,
    mean_ci,
    probability_of_improvement,
    slope,
    spearman,
    t_quantile,
    to_markdown,
    to_record,
)

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


def final_evaluation(
    data: str,
    seed: int,
    scores: dict,
    algo: str = "dt",
    setup: dict | None = None,
    run_id: str | None = None,
    values: tuple = (6000, 12000),
    seeds_role: str = "reporting",
    **protocol_args,
) -> dict:
    """final_evaluation.json as dtlab.train leaves it, with normalized `scores` per target
    ({6000: s, 12000: s}) for last.ckpt; `values`: the run's fixed targets (target_return.values)."""
    episodes = protocol_args.get("episodes", 10)
    summary = [
        {"target": float(t), "return_mean": ret(s), "return_std": 1.0, "normalized_score": s, "episodes": episodes}
        for t, s in scores.items()
    ]
    record = protocol(**protocol_args) | {"seeds_role": seeds_role, "targets": [float(t) for t in scores]}
    record["target_rule"] = record["target_rule"] | {"values": list(values), "quantiles": [] if values else [0.5, 1.0]}
    return {
        "kind": "final_evaluation",
        "run_id": run_id or f"{data}-{algo}-{seed}-{sorted(scores.items())}",
        "checkpoints": {"last": {"protocol": record, "episodes": [], "summary": summary}},
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


def make_run(root: Path, name: str, *args, **kwargs) -> Path:
    """A run dir as dtlab.train leaves it: .hydra/config.yaml and final_evaluation.json."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("trainer:\n  max_steps: 100\n")
    (run / "final_evaluation.json").write_text(json.dumps(final_evaluation(*args, **kwargs)))
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
    # the 95% t-CI: 42 +- t(0.975, 2) * 2 / sqrt(3), wider than the runs' range, as 3 runs are
    assert (dt["ci_low"], dt["ci_high"]) == pytest.approx((42 - 4.302653 * 2 / 3**0.5, 42 + 4.302653 * 2 / 3**0.5))
    assert dt["ci_method"] == "95% t-CI" and dt["headline"]
    assert dt["env"] == "HalfCheetah-v5" and dt["dataset"] == "halfcheetah-medium-v5"
    assert dt["behaviour"] == pytest.approx(35.0)
    (bc,) = group(report, algo="bc", target=12000.0)
    assert bc["mean"] == pytest.approx(33.0) and bc["calibration"]["spearman"] is None  # flat by construction
    # incomplete runs are listed with the reason
    assert [i["run"] for i in report["not_used"]] == ["sweep/killed"]
    # the 5-episode run is not pooled with the 10-episode ones, and the difference is named
    (other,) = group(report, algo="dt", target=12000.0, mean=90.0)
    assert other["scores"] == [90.0]
    assert other["protocol_differs"] == dt["protocol_differs"] == "episodes, data.top_fraction"
    assert (other["protocol"]["episodes"], other["episodes"], dt["protocol"]["episodes"]) == (5, 5, 10)
    (top,) = group(report, algo="dt", target=12000.0, mean=70.0)
    assert top["runs"] == 1 and "top_fraction" in top["protocol_differs"]
    assert report["setups"][top["setup_hash"]]["data.top_fraction"] == 0.1
    # the aggregate takes one protocol per task (the one with most runs): 3 runs each, P(dt > bc) = 1
    (agg_dt,) = [a for a in report["aggregates"] if a["algo"] == "dt"]
    assert agg_dt["runs"] == 3 and agg_dt["iqm"] == pytest.approx(42.0)
    (p,) = [p for p in report["improvement"] if (p["x"], p["y"]) == ("dt", "bc")]
    assert p["probability"] == 1.0
    markdown = (out / "report.md").read_text()
    assert "| HalfCheetah-v5 | halfcheetah-medium-v5 (episodes, data.top_fraction differ) | 35.0 | dt |" in markdown
    assert "| score (mean +- std) | 95% t-CI |" in markdown and "| IQM | 95% stratified-bootstrap CI |" in markdown
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
    from dtlab.report import bootstrap_ci

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
    # Both are 10,000-replicate percentile bootstraps of the same statistic, resampling runs
    # within each task, with different random draws: they agree up to Monte Carlo error. The
    # standard error of a 2.5% / 97.5% bootstrap quantile at 10k replicates is ~2% of the
    # bootstrap distribution's spread (here ~4 points wide), so 0.5 points is ~4 standard errors.
    np.testing.assert_allclose(ours, theirs["dt"][:, 0], atol=0.5)


def test_t_intervals_cover_at_3_5_and_10_runs():
    """20,000 synthetic groups of normal runs at each n: the 95% t-CI holds the true mean 95% of
    the time within 2 points (Monte Carlo error ~0.15 points). The percentile bootstrap it
    replaces covered ~75% at 3 runs: its 2.5% and 97.5% quantiles were the smallest and largest run."""
    rng = np.random.default_rng(0)
    for n in (3, 5, 10):
        groups = rng.normal(40.0, 7.0, size=(20_000, n))
        low, high = mean_ci(groups)
        coverage = np.mean((low <= 40.0) & (high >= 40.0))
        assert abs(coverage - 0.95) < 0.02, (n, coverage)
    low, high = mean_ci([81.1, 92.0, 96.0])  # BC on halfcheetah-expert: the range was [81.1, 96.0]
    assert (round(low, 1), round(high, 1)) == (70.5, 108.9)
    assert all(math.isnan(v) for v in mean_ci([50.0]))  # one run: no interval
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 9, 29, 200):
        assert t_quantile(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-12)


def test_two_records_that_differ_only_in_reward_scale_are_two_groups_and_the_key_is_named():
    records = [
        to_record(final_evaluation("halfcheetah-medium-v5", seed, {12000: 40.0 + seed}, setup=setup), f"r{seed}")
        for seed, setup in ((0, {"data": {"reward_scale": 0.001}}), (1, {"data": {"reward_scale": 0.0001}}))
    ]
    report = build_report(records, [])
    groups = [g for g in report["groups"] if g["target"] == 12000.0]
    assert [g["runs"] for g in groups] == [1, 1]
    assert {report["setups"][g["setup_hash"]]["data.reward_scale"] for g in groups} == {1e-3, 1e-4}
    assert [g["protocol_differs"] for g in groups] == ["data.reward_scale"] * 2
    assert "halfcheetah-medium-v5 (data.reward_scale differ)" in to_markdown(report)
    # a key an older record lacks is its default: the same setup as a record that gives it
    old = final_evaluation("halfcheetah-medium-v5", 2, {12000: 41.0}, setup={"data": {"reward_scale": 0.001}})
    new = final_evaluation("halfcheetah-medium-v5", 3, {12000: 43.0}, setup={"data": {"reward_scale": 0.001}})
    old["config"]["model"] = {"n_layer": 3}  # written before the model had these keys
    new["config"]["model"] = {"n_layer": 3, "timestep_embedding": True, "return_init": "gpt2", "compile": True}
    new["config"]["threads"], new["config"]["paths"] = 1, {"output_dir": "/elsewhere"}  # not the numbers
    (pooled,) = [g for g in build_report([to_record(old, "o"), to_record(new, "n")], [])["groups"] if g["target"]]
    assert pooled["runs"] == 2 and pooled["protocol_differs"] == ""


def test_the_same_runs_reached_through_two_roots_count_once(sweep, tmp_path, caplog):
    """`dtlab.report outputs/multirun/T --records R`, then `dtlab.report outputs R`: the run
    dirs and their records are the same runs (one run id each), counted once."""
    main([str(sweep), "--out", str(tmp_path / "first"), "--records", str(tmp_path / "records")])
    # the records are named after the sweep ("sweep/medium-0"), the run dirs under tmp_path after
    # tmp_path ("<tmp>/sweep/medium-0"): by name they were two runs each
    records, not_used = find_runs([tmp_path])
    assert len(records) == 8 and sum("counted once" in n["reason"] for n in not_used) == 8
    report = build_report(records, not_used)
    (dt,) = group(report, algo="dt", target=12000.0, checkpoint="last", runs=3)
    assert dt["scores"] == [40.0, 42.0, 44.0] and report["runs"] == 8
    # a record that shares a run's id but not its scores: a warning, and only the first is used
    copy = json.loads((tmp_path / "records" / "sweep_medium-0.json").read_text())
    copy["checkpoints"]["last"]["summary"][1]["normalized_score"] = 99.0
    (tmp_path / "edited").mkdir()
    (tmp_path / "edited" / "medium-0.json").write_text(json.dumps(copy | {"run": "edited/medium-0"}))
    with caplog.at_level("WARNING", logger="dtlab.report"):
        records, not_used = find_runs([sweep, tmp_path / "edited"])
    assert len(records) == 8 and "shares run id" in caplog.text
    assert [n["run"] for n in not_used if "not its scores" in n["reason"]] == ["edited/medium-0"]


def test_a_run_without_a_fixed_target_and_development_seeds_are_listed_not_used():
    """The headline target is the highest of the run's fixed targets (a default run on the
    sample asks for 4074 and 11544, not the env's 6000 and 12000); a run whose targets are all
    data-relative has none, and is listed with the reason instead of vanishing; so is a run
    evaluated on development seeds."""
    sample = final_evaluation("sample", 0, {4074: 50.0, 11544: 60.0}, values=(4074, 11544))
    assert to_record(sample, "sample")["headline_target"] == 11544
    relative = to_record(final_evaluation("halfcheetah-medium-v5", 1, {2000: 30.0, 4000: 35.0}, values=()), "q")
    assert relative["headline_target"] is None
    dev = to_record(final_evaluation("halfcheetah-medium-v5", 2, {12000: 90.0}, seeds_role="development"), "dev")
    report = build_report([to_record(sample, "sample"), relative, dev], [])
    assert report["runs"] == 1 and {g["dataset"] for g in report["groups"]} == {"sample"}
    reasons = {n["run"]: n["reason"] for n in report["not_used"]}
    assert reasons["q"].startswith("no fixed target") and reasons["dev"].startswith("development seeds")
    markdown = to_markdown(report)
    assert "- q: no fixed target" in markdown and "- dev: development seeds" in markdown


def test_a_paper_table_row_is_one_protocol_and_marks_a_cell_whose_setup_differs_from_dts():
    runs = [to_record(final_evaluation("hopper-medium-v5", s, {12000: 40.0 + s}), f"dt{s}") for s in range(3)]
    # BC: most of its runs under another protocol (5 episodes), one under the row's
    runs += [
        to_record(final_evaluation("hopper-medium-v5", s, {12000: 30.0 + s}, algo="bc", episodes=5), f"bc5ep{s}")
        for s in range(3)
    ]
    runs.append(to_record(final_evaluation("hopper-medium-v5", 9, {12000: 33.0}, algo="bc"), "bc"))
    # 10%BC under the row's protocol, at another batch size than the DT's (its top_fraction is its own)
    pct = {"data": {"top_fraction": 0.1, "batch_size": 32}}
    runs += [
        to_record(final_evaluation("hopper-medium-v5", s, {12000: 50.0 + s}, algo="pct_bc", setup=pct), f"p{s}")
        for s in range(2)
    ]
    report = build_report(runs, [])
    markdown = to_markdown(report)
    assert "| 33.0 [-] (1) | 50.5 [" in markdown and "(2) \\* |" in markdown
    assert "- \\* HalfCheetah-v5 hopper-medium-v5 10%BC: data.batch_size" in markdown
    table = {(g["algo"], g["runs"]) for g in report["groups"] if g["in_table"]}
    assert table == {("dt", 3), ("bc", 1), ("pct_bc", 2)}  # the row's protocol: 10 episodes, 6 of its 11 runs
    assert {a["algo"]: a["runs"] for a in report["aggregates"]} == {"dt": 3, "bc": 1, "pct_bc": 2}


def test_probability_of_improvement_interval_agrees_with_rliable():
    rliable_metrics = pytest.importorskip("rliable.metrics")
    rliable_library = pytest.importorskip("rliable.library")
    from dtlab.report import bootstrap_ci

    rng = np.random.default_rng(1)
    x, y = rng.normal(50, 10, size=(5, 3)), rng.normal(45, 10, size=(5, 3))  # runs x tasks
    _, theirs = rliable_library.get_interval_estimates(
        {"pair": (x, y)},
        lambda a, b: np.array([rliable_metrics.probability_of_improvement(a, b)]),
        reps=1000,  # rliable's bootstrap calls Python per replicate: ~4 ms each
        random_state=np.random.RandomState(0),
    )
    ours = bootstrap_ci(list(x.T) + list(y.T), lambda t: probability_of_improvement(t[:3], t[3:]))
    # P is a multiple of 1/75 here; 0.04 is 3 of them, ~2 standard errors of a 1000-replicate quantile
    np.testing.assert_allclose(ours, theirs["pair"][:, 0], atol=0.04)


def test_the_docs_results_are_the_committed_records_report():
    """docs/results.md's tables are report.md of the committed run records, as their commands
    say: regenerating them from benchmarks/results/runs/ gives the same text. The README's
    compact table is that report's first table and its aggregates, cut from the same text."""
    root = Path(__file__).resolve().parents[1]
    results, readme = (root / "docs" / "results.md").read_text(), (root / "README.md").read_text()
    runs = root / "benchmarks" / "results" / "runs"

    def between(text: str, name: str) -> str:
        start, end = f"<!-- report:{name} -->\n", f"<!-- /report:{name} -->"
        return text[text.index(start) + len(start) : text.index(end)]

    tables = [("paper-table", ["paper-table"], 90), ("odt", ["odt"], 6)]
    for name, dirs, count in tables:
        records, not_used = find_runs([runs / d for d in dirs])
        assert len(records) == count and not not_used, name
        markdown = to_markdown(build_report(records, not_used))
        assert markdown == between(results, name), name
        if name == "paper-table":
            paragraphs = markdown.split("\n\n")  # the per-dataset table, ..., the IQM table
            assert paragraphs[4].startswith("| algo | tasks | runs | IQM")
            assert between(readme, "paper-table-headline") == paragraphs[0] + "\n\n" + paragraphs[4] + "\n"


def test_the_report_goes_to_one_offline_wandb_run(sweep, tmp_path):
    from dtlab.tracking import read_offline_run

    out = tmp_path / "out"
    main([str(sweep), "--out", str(out), "--wandb"])
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    run = read_offline_run(run_dir)
    logged = set().union(*(row for row in run["history"]))
    assert {"report/groups", "report/aggregates", "report/HalfCheetah-v5-halfcheetah-medium-v5"} <= logged
