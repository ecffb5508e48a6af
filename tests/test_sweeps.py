import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import DictConfig, OmegaConf

from dtlab.tracking import read_offline_run

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "sweeps").glob("*.yaml"))


def run_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # one torch thread per process: jobs and DDP workers share the cores
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "dtlab.train", *args]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def sample(spec: dict) -> object:
    """One value a W&B sweep could pass for a parameter spec."""
    if "min" in spec:  # a distribution; PyYAML reads 1e-5 (no dot) as a string, which W&B rejects
        assert all(isinstance(spec[k], int | float) for k in ("min", "max")), spec
        return spec["min"]
    return spec["value"] if "value" in spec else spec["values"][0]


@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_wandb_sweep_spec_composes_as_hydra_overrides(path, make_cfg):
    spec = yaml.safe_load(path.read_text())
    assert spec["command"][-1] == "${args_no_hyphens}" and "dtlab.train" in spec["command"]
    assert spec["method"] in ("grid", "random", "bayes") and spec["metric"]["name"] == "eval/normalized_score"
    overrides = [f"{key}={sample(p)}" for key, p in spec["parameters"].items()]
    cfg = make_cfg(*overrides)  # raises on a key train.yaml does not have
    for key, p in spec["parameters"].items():
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, DictConfig):  # a group choice (dataset=d4rl) selects a whole node
            assert value == sample(p)


def test_presets_and_slurm_launcher_compose(make_cfg):
    seeds = make_cfg("sweep=seeds").hydra.sweeper.params
    assert seeds == {"seed": "range(5)"}
    assert make_cfg("sweep=datasets").dataset._target_ == "dtlab.data.load_hub"
    optuna = make_cfg("hparams_search=optuna").hydra.sweeper
    assert optuna.direction == "maximize" and optuna.storage is None
    assert set(optuna.params) == {"model.learning_rate", "model.dropout", "model.context_length", "model"}
    slurm = make_cfg("hydra/launcher=slurm").hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.timeout_min == 720


def test_joblib_multirun_gives_one_run_dir_and_one_wandb_run_per_job(tmp_path):
    sweep = tmp_path / "my-sweep"
    run_train(
        "-m",
        "debug=smoke",
        "trainer.max_steps=10",
        "seed=0,1",
        "model=tiny",
        "hydra/launcher=joblib",
        "threads=1",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    runs = []
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
        (run_dir,) = (sweep / job / "wandb").glob("offline-run-*")
        runs.append(read_offline_run(run_dir))
    assert len({r["id"] for r in runs}) == 2 and {r["group"] for r in runs} == {"my-sweep"}
    assert [r["name"] for r in runs] == ["debug=smoke,model=tiny,seed=0,trainer.max_steps=10"] + [
        "debug=smoke,model=tiny,seed=1,trainer.max_steps=10"
    ]
    assert [r["config"]["seed"] for r in runs] == [0, 1]


def test_optuna_search_completes_and_reports_the_best_parameters(tmp_path):
    sweep = tmp_path / "search"
    result = run_train(
        "hparams_search=optuna",
        "debug=smoke",
        "hydra.sweeper.n_trials=3",
        "threads=1",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert "Best parameters" in result.stdout + result.stderr
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"model.learning_rate", "model.dropout", "model.context_length", "model"}
    runs = [read_offline_run(d) for d in sorted(sweep.glob("*/wandb/offline-run-*"))]
    assert len(runs) == 3 and len({r["group"] for r in runs}) == 1
    # the value Optuna maximized is each job's final eval/normalized_score
    assert best["best_value"] == pytest.approx(max(r["summary"]["eval/normalized_score"] for r in runs))


def test_ddp_on_two_cpu_processes_gives_one_run_dir_checkpoint_and_evaluation(tmp_path):
    out = tmp_path / "run"
    run_train("trainer=ddp", "debug=smoke", f"hydra.run.dir={out}", cwd=tmp_path)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert sorted(p.name for p in (out / "eval").iterdir()) == [
        "return_conditioning_step10.png",
        "return_conditioning_step20.png",
    ]
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    run = read_offline_run(run_dir)
    assert run["config"]["trainer"]["strategy"] == "ddp_spawn" and run["config"]["trainer"]["devices"] == 2
    evals = [row["trainer/global_step"] for row in run["history"] if "eval/return_conditioning" in row]
    assert evals == [10, 20]  # one set of rollouts per evaluation, from rank 0
    assert "eval/normalized_score" in run["summary"]
