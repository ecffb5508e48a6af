import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from dtlab import DTLabError
from dtlab.cli import CONF_DIR
from dtlab.config import TrainConfig, check_config
from dtlab.rollout import check_env
from dtlab.tracking import read_offline_run
from dtlab.train import warn_if_d4rl_in_v5

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "sweeps").glob("*.yaml"))


def run_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # one torch thread per process: jobs and DDP workers share the cores
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "dtlab.train", *args]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def spec_values(spec: dict) -> list:
    """Every value a W&B sweep could pass for a parameter spec: each listed value, or a
    distribution's two ends."""
    if "min" in spec:  # a distribution; PyYAML reads 1e-5 (no dot) as a string, which W&B rejects
        assert all(isinstance(spec[k], int | float) for k in ("min", "max")), spec
        return [spec["min"], spec["max"]]
    return [spec["value"]] if "value" in spec else list(spec["values"])


def sweep_values(key: str, value: str) -> list[str]:
    """Every value of one Hydra sweeper parameter (`a,b`, `range(3)`, `choice(...)`), or an
    interval's two ends."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import IntervalSweep

    override = OverridesParser.create().parse_override(f"{key}={value}")
    sweep = override.value()
    if isinstance(sweep, IntervalSweep):
        return [str(sweep.start), str(sweep.end)]
    return list(override.sweep_string_iterator()) if override.is_sweep_override() else [str(sweep)]


HUB_CONFIGS = {  # what the hub copy has: 3 envs x 3 datasets (no medium-expert: dtlab concatenates it)
    f"{env}-{data}-v2"
    for env in ("halfcheetah", "hopper", "walker2d")
    for data in ("medium", "medium-replay", "expert")
}


@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_every_value_of_every_wandb_sweep_spec_composes(path, make_cfg):
    spec = yaml.safe_load(path.read_text())
    assert spec["command"][-1] == "${args_no_hyphens}" and "dtlab.train" in spec["command"]
    assert spec["method"] in ("grid", "random", "bayes") and spec["metric"]["name"] == "eval/normalized_score"
    for key, p in spec["parameters"].items():
        for value in spec_values(p):
            cfg = make_cfg(f"{key}={value}")  # raises on a key or option train.yaml does not have
            check_config(cfg, TrainConfig)
            selected = OmegaConf.select(cfg, key)
            if not isinstance(selected, DictConfig):  # a group choice (dataset=hub/...) selects a whole node
                assert selected == value
            assert set(hub_names(cfg)) <= HUB_CONFIGS


PRESETS = sorted(
    (group, path.stem) for group in ("sweep", "hparams_search") for path in (Path(CONF_DIR) / group).glob("*.yaml")
)


@pytest.mark.parametrize(("group", "option"), PRESETS, ids=[f"{g}={o}" for g, o in PRESETS])
def test_every_value_of_every_multirun_preset_composes(make_cfg, group, option):
    base = make_cfg(f"{group}={option}")
    params = base.hydra.sweeper.params
    assert params
    # the sweeps over shared-data presets require their data folder (data_dir: ???)
    data_dir = ["++data_dir=/data"]
    for key, value in params.items():
        values = sweep_values(key, str(value))
        assert values, key
        for v in values:
            cfg = make_cfg(f"{group}={option}", f"{key}={v}", *data_dir)
            check_config(cfg, TrainConfig)
            assert set(hub_names(cfg)) <= HUB_CONFIGS, (key, v)


def hub_names(cfg: DictConfig) -> list[str]:
    if cfg.dataset.get("_target_") != "dtlab.data.load_hub":
        return []
    name = cfg.dataset.name
    return [name] if isinstance(name, str) else list(name)


@pytest.mark.parametrize("path", sorted((Path(CONF_DIR) / "dataset" / "hub").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_hub_preset_names_real_configs_and_builds_its_v4_env(path, make_cfg):
    cfg = make_cfg(f"dataset=hub/{path.stem}")
    assert set(hub_names(cfg)) <= HUB_CONFIGS and hub_names(cfg)
    assert cfg.env.id.endswith("-v4")
    check_env(cfg.env)  # gymnasium still builds v4, with the dims the env config says


def test_d4rl_data_in_a_v5_env_says_what_differs(caplog):
    for env_id in ("Hopper-v5", "Hopper-v4"):
        warn_if_d4rl_in_v5("dtlab.data.load_hub", env_id)
    warn_if_d4rl_in_v5("dtlab.data.load_local", "Walker2d-v5")  # not D4RL data
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "Hopper-v5 no longer pays the healthy reward" in messages[0]


def test_presets_and_slurm_launcher_compose(make_cfg):
    seeds = make_cfg("sweep=seeds").hydra.sweeper.params
    assert seeds == {"seed": "range(5)"}
    assert make_cfg("sweep=datasets").hydra.sweeper.params.dataset.startswith("hub/halfcheetah-medium,")
    optuna = make_cfg("hparams_search=optuna").hydra.sweeper
    assert optuna.direction == "maximize" and optuna.storage is None
    assert set(optuna.params) == {"model.learning_rate", "model.dropout", "model.context_length", "model"}
    slurm = make_cfg("hydra/launcher=slurm").hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.timeout_min == 720


def test_cpu_budget_gives_bc_its_own_steps_and_the_command_line_the_last_word(make_cfg):
    steps = {
        algo: make_cfg("experiment=halfcheetah-expert", f"algo={algo}").trainer.max_steps
        for algo in ("dt", "bc", "pct_bc", "odt")
    }
    assert steps == {"dt": 4000, "bc": 8000, "pct_bc": 8000, "odt": 4000}
    assert make_cfg("experiment=halfcheetah-expert", "algo=bc", "trainer.max_steps=4000").trainer.max_steps == 4000
    assert make_cfg("algo=bc").trainer.max_steps == 4000  # no preset: trainer/cpu's, as for any algorithm


def test_the_budget_keys_act_where_they_are_set_and_are_refused_where_not(make_cfg):
    cfg = make_cfg("experiment=halfcheetah-expert", "algo=bc", "budget_steps.bc=100", "++data_dir=/data")
    check_config(cfg, TrainConfig)
    assert cfg.trainer.max_steps == 100  # the preset's budget of the run's algorithm, typed
    for refused in (
        ("algo=bc", "+budget_steps.bc=100"),  # no experiment=cpu-budget: nothing reads it
        ("experiment=halfcheetah-expert", "algo=dt", "budget_steps.bc=100", "++data_dir=/data"),  # not the run's
        ("experiment=halfcheetah-expert", "algo=bc", "budget_steps.bc=100", "trainer.max_steps=5", "++data_dir=/d"),
        ("algo=bc", "+algo.cpu_budget_steps=100"),  # the key it replaces, from a config file too
        ("algo=odt", "+online.checkpoints_dir=/elsewhere"),
    ):
        with pytest.raises(DTLabError, match=r"budget_steps\.bc=100 does not act here|is no longer a key"):
            check_config(make_cfg(*refused), TrainConfig)


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
    # the final evaluation ran once, on rank 0, and reached the one W&B run
    final = json.loads((out / "final_evaluation.json").read_text())
    assert set(final["checkpoints"]) == {"last", "best"}
    assert {"final/last/4074/normalized_score", "final/best/step"} <= set(run["summary"])


def test_one_multirun_trains_dt_bc_and_pct_bc_and_each_checkpoint_evaluates(tmp_path, make_cfg):
    from dtlab.evaluate import evaluate

    sweep = tmp_path / "algos"
    run_train("-m", "algo=dt,bc,pct_bc", "debug=smoke", "threads=1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    runs = [read_offline_run(next((sweep / job / "wandb").glob("offline-run-*"))) for job in ("0", "1", "2")]
    assert [r["config"]["algo"]["name"] for r in runs] == ["dt", "bc", "pct_bc"] and len({r["id"] for r in runs}) == 3
    assert [r["config"]["data"]["top_fraction"] for r in runs] == [1.0, 1.0, 0.1]
    for job, policy in zip(("0", "1", "2"), ("dt", "mlp_bc", "mlp_bc"), strict=True):
        ckpt = sweep / job / "checkpoints" / "last.ckpt"
        assert torch.load(ckpt, map_location="cpu", weights_only=False)["hyper_parameters"]["policy"] == policy
        report = evaluate(make_cfg(f"ckpt_path={ckpt}", "eval.final_episodes=2", config="evaluate"))
        assert len(report["episodes"]) == 4 and report["protocol"]["step"] == 20
