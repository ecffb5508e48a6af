import json
import logging
import math
from pathlib import Path

import pytest
import wandb
from hydra.utils import instantiate

from dtlab import DTLabError
from dtlab.cli import PLUGINS, check_plugins
from dtlab.tracking import read_offline_run
from dtlab.train import train


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_fit_logs_config_metrics_media_and_checkpoints_to_an_offline_run(make_cfg, tmp_path):
    cfg = make_cfg("debug=smoke", "eval.video=true", "eval.video_frames=5", "logger.wandb.log_model=true")
    metrics = train(cfg)
    assert wandb.run is None  # train() finished its run
    (run_dir,) = offline_runs(tmp_path)
    run = read_offline_run(run_dir)

    # the resolved Hydra config is the run config (and only it: not the module's hparams again)
    assert run["project"] == "dtlab" and run["group"] == ""  # a single run: no group
    assert run["name"] == "debug=smoke,eval.video=true,eval.video_frames=5,logger.wandb.log_model=true"
    assert run["config"]["model"]["n_embd"] == 32 and run["config"]["env"]["id"] == "HalfCheetah-v5"
    assert run["config"]["data"]["context_length"] == 5 and "state_mean" not in run["config"]

    losses = [row["train/loss"] for row in run["history"] if "train/loss" in row]
    assert len(losses) >= 3 and all(math.isfinite(x) for x in losses)
    evals = [row for row in run["history"] if "eval/normalized_score" in row]
    assert {"eval/4074/return_mean", "eval/11476/normalized_score"} <= set(evals[-1])
    scores = [row["eval/normalized_score"] for row in evals]
    summary = run["summary"]
    assert summary["eval/normalized_score"] == pytest.approx(metrics["eval/normalized_score"])
    assert summary["eval/normalized_score_best"] == pytest.approx(max(scores))

    def media(key: str) -> list[dict]:
        return [row[key] for row in run["history"] if key in row]

    plots = media("eval/return_conditioning")
    assert len(plots) == 2  # evaluations at steps 10 and 20
    assert all((run_dir / "files" / name).is_file() for plot in plots for name in plot["filenames"])
    videos = media("eval/video")[-1]["videos"]
    assert [v["caption"] for v in videos] == ["target 4074", "target 11476"]
    assert all((run_dir / "files" / v["path"]).stat().st_size > 1000 for v in videos)
    table = json.loads((run_dir / "files" / media("eval/episodes")[-1]["path"]).read_text())
    assert table["columns"] == ["target", "episode", "seed", "return", "normalized_score", "length"]
    assert [row[:3] for row in table["data"]] == [[4074, 0, 0], [4074, 1, 1], [11476, 0, 2], [11476, 1, 3]]

    models = [a for a in run["artifacts"] if a["type"] == "model"]
    assert sorted(sorted(a["aliases"]) for a in models) == [["best", "latest"], ["latest"]]
    assert all(a["files"] == ["model.ckpt"] for a in models)


def test_no_credentials_means_offline_in_the_run_dir_and_one_line(make_cfg, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    logger = instantiate(make_cfg().logger.wandb)
    with caplog.at_level(logging.WARNING, logger="dtlab.tracking"):
        run = logger.experiment
    logger.finish()
    (run_dir,) = offline_runs(tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.name == "dtlab.tracking"]
    assert run.offline and lines == [
        f"W&B: logging offline (no W&B credentials (wandb login or WANDB_API_KEY)); upload later with: "
        f"wandb sync {run_dir}"
    ]


def test_wandb_that_cannot_start_falls_back_to_offline(make_cfg, tmp_path, monkeypatch, caplog):
    # online asked, but no credentials (and a closed port, should wandb find some elsewhere)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = make_cfg(
        "logger.wandb.mode=online",
        "+logger.wandb.settings.init_timeout=3",
        "+logger.wandb.settings.base_url=http://127.0.0.1:9",
    )
    logger = instantiate(cfg.logger.wandb)
    with caplog.at_level(logging.WARNING, logger="dtlab.tracking"):
        run = logger.experiment
    logger.finish()
    assert run.offline and len(offline_runs(tmp_path)) == 1
    (line,) = [r.getMessage() for r in caplog.records if r.name == "dtlab.tracking"]
    assert line.startswith("W&B: logging offline (W&B could not start (") and "wandb sync " in line


def test_a_missing_plugin_is_named_in_one_line(monkeypatch):
    monkeypatch.setitem(PLUGINS, "hydra/launcher=joblib", ("no_such_module", "hydra-joblib-launcher"))
    with pytest.raises(DTLabError, match=r"^hydra/launcher=joblib needs hydra-joblib-launcher: pip install"):
        check_plugins(["debug=smoke", "hydra/launcher=joblib"])
    check_plugins(["hparams_search=optuna"])  # installed here
