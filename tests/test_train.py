import json
import logging
import math
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate

from dtlab.cli import CONF_DIR
from dtlab.config import EvaluateConfig, TrainConfig, check_config
from dtlab.data import episodes_from_dataset, episodes_to_dataset
from dtlab.module import DTModule
from dtlab.train import train

GROUPS = {
    p.name: sorted(str(f.relative_to(p).with_suffix("")) for f in p.rglob("*.yaml"))
    for p in [*Path(CONF_DIR).iterdir(), Path(CONF_DIR) / "hydra" / "launcher"]
    if p.is_dir() and p.name not in ("hydra", "recipe")  # recipe: dtlab.collect's (tests/test_collect.py)
}
GROUPS["hydra/launcher"] = GROUPS.pop("launcher")
OPTIONS = [(g, o) for g, options in GROUPS.items() for o in options]
# Two 30-step HalfCheetah-sized episodes, for the data module of every config
TWO_EPISODES = episodes_from_dataset(
    episodes_to_dataset(np.zeros((60, 17)), np.zeros((60, 6)), np.ones(60), np.zeros(60, bool), np.array([30, 30]))
)
# What an option needs besides itself to be instantiated.
NEEDS = {
    ("dataset", "local"): ["dataset.path=whatever.parquet"],
    ("dataset", "d4rl_hdf5"): ["dataset.path=whatever.hdf5"],
    ("dataset", "mixture"): ["dataset.sources.medium.path=a.parquet", "dataset.sources.expert.path=b.parquet"],
    ("target_return", "custom"): ["target_return.values=[1000]"],
    ("experiment", "cpu-budget"): ["dataset.path=whatever.parquet"],  # the base of the dataset presets: no file
}


def test_groups_exist():
    expected = {
        "env",
        "dataset",
        "model",
        "target_return",
        "trainer",
        "logger",
        "callbacks",
        "debug",
        "experiment",
        "eval",
    }
    assert expected <= set(GROUPS)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_config_composes_and_instantiates(make_cfg, group, option):
    # the dataset presets and their sweeps require their data folder (data_dir: ???); nothing here reads it
    data_dir = ["++data_dir=/data"] if group in ("experiment", "sweep") else []
    cfg = make_cfg(f"{group}={option}", *NEEDS.get((group, option), []), *data_dir)
    if (group, option) == ("env", "from_dataset"):
        return  # resolving it reads a Minari dataset: instantiated in tests/test_sources.py
    check_config(cfg, TrainConfig)  # every shipped config passes the schema
    instantiate(cfg.dataset)  # a loader: loading happens in dtlab.train
    instantiate(cfg.data, _partial_=True)(episodes=TWO_EPISODES)
    dims = {"env_id": "x", "state_dim": 17, "act_dim": 6, "max_ep_len": 1000, "reward_scale": 0.001}
    instantiate(cfg.model, state_mean=[0.0] * 17, state_std=[1.0] * 17, **dims)
    for c in (cfg.callbacks or {}).values():
        instantiate(c)
    if cfg.get("online") is not None:  # algo=odt's stage; dtlab.train passes env and targets
        instantiate(cfg.online, env=dict(cfg.env), target_return=dict(cfg.target_return))
    for c in (cfg.logger or {}).values():
        instantiate(c)
    if cfg.trainer.accelerator == "cpu":  # other accelerators are composed, not started
        instantiate(cfg.trainer, logger=False, enable_checkpointing=False)


def test_tiny_fit_through_compose_api(make_cfg, tmp_path):
    cfg = make_cfg(
        "debug=smoke",
        "env.max_episode_steps=20",  # a short evaluation must not shrink the model
        "trainer.max_steps=25",  # evaluations at 10, 20 and the last step, 25
        "trainer.log_every_n_steps=1",
        "model.lr_schedule=cosine",
        "logger=csv",
    )
    metrics = train(cfg)
    assert {"train/loss", "val/action_mse", "eval/normalized_score"} <= set(metrics)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    module = DTModule.load_from_checkpoint(ckpt)
    assert module.hparams.env_id == "HalfCheetah-v5" and module.hparams.context_length == 5
    assert module.hparams.max_ep_len == 1000 and module.model.embed_timestep.weight.shape[0] == 1000
    history = pd.read_csv(tmp_path / "csv" / "version_0" / "metrics.csv")
    assert history["train/loss"].notna().sum() == 25 and history["val/action_mse"].notna().sum() == 2
    evals = history.dropna(subset=["eval/normalized_score"]).set_index("step")["eval/normalized_score"]
    assert list(evals.index) == [10, 20, 25]
    # best.ckpt holds the best evaluation's step, the last step's competing too
    best = torch.load(tmp_path / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert best["global_step"] == evals.idxmax()
    # the learning rate: linear warmup over 10 steps, then cosine decay to 0 at step 25
    lr = history.dropna(subset=["train/lr"]).set_index("step")["train/lr"]
    base, warmup, total = 1e-4, 10, 25
    for step, value in lr.items():
        expected = (
            base * (step + 1) / warmup
            if step < warmup
            else base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        )
        assert value == pytest.approx(expected, rel=1e-6), step
    assert len(lr) == 25
    # act() on a real observation, from the checkpoint alone
    env = gym.make("HalfCheetah-v5")
    obs, _ = env.reset(seed=0)
    action = module.act(obs[None], np.zeros((1, 6)), np.array([6000.0]), np.array([0]))
    assert action.shape == (6,) and env.action_space.contains(action.astype(np.float32))


def test_best_checkpoint_with_only_the_last_evaluation(make_cfg, tmp_path, capsys):
    # ... and with development seeds, as a recipe study runs: its final evaluation says so,
    # in the record and in the table it prints (which once called them reporting seeds)
    train(make_cfg("debug=smoke", "eval.every_n_steps=0", "logger=none", "eval.dev_seed=20000"))
    final = json.loads((tmp_path / "final_evaluation.json").read_text())["checkpoints"]
    for record in final.values():
        assert record["protocol"]["seeds"] == [20000, 20003] and record["protocol"]["seeds_role"] == "development"
    assert "env seeds 20000-20003 (development: for choosing a recipe, never for reporting)" in capsys.readouterr().out
    best = torch.load(tmp_path / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert best["global_step"] == 20


def test_small_is_the_papers_model_and_old_checkpoints_act_as_before(make_cfg):
    model = make_cfg("model=small").model
    assert (model.activation, model.action_tanh, model.n_layer, model.n_embd, model.context_length) == (
        "relu",
        True,
        3,
        128,
        20,
    )
    assert model.init == "reference"  # the reference code's, not transformers' (dtlab.model.DTConfig)
    assert make_cfg("experiment=hopper-mixed").model.init == "reference"  # the presets' model
    fixture = Path(__file__).parent / "fixtures"
    path = fixture / "dtlab-0.1.0-smoke.ckpt"
    assert "activation" not in torch.load(path, map_location="cpu", weights_only=False)["hyper_parameters"]
    old = DTModule.load_from_checkpoint(path, map_location="cpu")
    assert isinstance(old.model.h[0].mlp.act, torch.nn.GELU) and old.model.embed_timestep.num_embeddings == 50
    recorded = json.loads((fixture / "dtlab-0.1.0-smoke-acts.json").read_text())
    for case in recorded["cases"]:
        action = old.act(
            np.array(case["states"]), np.array(case["actions"]), np.array(case["returns_to_go"]), case["timesteps"]
        )
        np.testing.assert_allclose(action, case["action"], atol=1e-6)


def test_the_default_recipe_is_dropped_whole_by_choosing_another_model(make_cfg):
    default = make_cfg()
    recipe = (default.model.timestep_embedding, default.model.init, default.model.return_init, default.model.dropout)
    assert recipe == (False, "gpt2", "torch", 0.0) and default.data.reward_scale == 0.0001  # conf/model/cpu.yaml
    assert default.data.start_share == 0.25
    assert make_cfg("model.dropout=0.2").data.reward_scale == 0.0001  # a key override keeps the rest
    for other in ("small", "tiny"):
        cfg = make_cfg(f"model={other}")
        assert cfg.model.get("timestep_embedding", True) and cfg.data.reward_scale == 0.001  # the paper's
        assert cfg.data.start_share == 0.0  # the paper's uniform window draw
    # the recipe follows the data: it is the sample's, and any other data gets the paper's model
    for data in (("dataset=local", "dataset.path=x.parquet"), ("dataset=hub/hopper-medium",)):
        cfg = make_cfg(*data)
        assert (cfg.model.init, cfg.model.dropout, cfg.data.reward_scale) == ("reference", 0.1, 0.001), data
        assert cfg.model.get("timestep_embedding", True), data
    # ... or the presets' (the recipe study's winner): the paper's model at the reference init and
    # reward scale, without the timestep table and dropout
    preset = make_cfg("experiment=hopper-mixed")
    assert (preset.model.init, preset.model.dropout, preset.data.reward_scale) == ("reference", 0.0, 0.001)
    assert preset.model.timestep_embedding is False and preset.data.start_share == 0.0
    assert make_cfg("model=cpu", "dataset=local", "dataset.path=x.parquet").data.reward_scale == 0.0001  # if asked


def test_evaluate_falls_back_to_paper_targets_for_a_checkpoint_that_does_not_record_its_own(make_cfg, caplog):
    from dtlab.evaluate import evaluate

    old = Path(__file__).parent / "fixtures" / "dtlab-0.1.0-smoke.ckpt"  # written before runs recorded targets
    args = ("env.max_episode_steps=5", "eval.final_episodes=1", "eval.backend=eager")
    with caplog.at_level(logging.INFO, logger="dtlab.evaluate"):
        report = evaluate(make_cfg(f"ckpt_path={old}", "env=halfcheetah", *args, config="evaluate"))
    assert report["protocol"]["targets"] == [6000.0, 12000.0]  # HalfCheetah's paper targets
    assert "does not record the targets its run evaluated at" in caplog.text
    # asked for, targets are the user's, whatever the checkpoint records
    for custom in (("target_return=custom", "target_return.values=[100]"), ("target_return.values=[100]",)):
        report = evaluate(make_cfg(f"ckpt_path={old}", "env=halfcheetah", *args, *custom, config="evaluate"))
        assert report["protocol"]["targets"] == [100.0]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dtlab.train", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_cli_run_with_overrides(tmp_path):
    out = tmp_path / "run"
    result = run_cli("debug=smoke", "model.n_embd=16", "data.batch_size=4", f"hydra.run.dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in (out / "eval").glob("*.png")) == [
        "return_conditioning_step10.png",
        "return_conditioning_step20.png",
    ]
    assert "run dir:" in result.stdout + result.stderr
    assert DTModule.load_from_checkpoint(out / "checkpoints" / "last.ckpt").hparams.n_embd == 16


def test_wrong_observation_size_fails_fast_in_one_line(tmp_path):
    from datasets import Dataset

    path = tmp_path / "bad.parquet"
    Dataset.from_dict(
        {"observations": [[[0.0] * 11] * 30], "actions": [[[0.0] * 6] * 30], "rewards": [[1.0] * 30]}
    ).to_parquet(path)
    start = time.time()
    result = run_cli("dataset=local", f"dataset.path={path}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    # seconds, not a training run's minutes; loose, since the suite's other worker shares the cores
    assert time.time() - start < 30
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == (
        "dtlab: error: dataset has observation size 11 and action size 6, but the env expects 17 and 6: "
        "choose the env the data was recorded in (env=...)"
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_evaluate_config_passes_the_schema(make_cfg):
    check_config(make_cfg("ckpt_path=x.ckpt", config="evaluate"), EvaluateConfig)
    check_config(make_cfg("ckpt_path=x.ckpt", "env=hopper", config="evaluate"), EvaluateConfig)
