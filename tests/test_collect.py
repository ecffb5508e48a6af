"""dtlab.collect: datasets rolled out from an SB3 agent, a dtlab checkpoint and its ONNX export,
loaded back and trained on; recipes that cannot run say why."""

import json
import re

import numpy as np
import pytest
import torch

from dtlab import DTLabError
from dtlab.collect import collect, episode_counts
from dtlab.data import episodes_from_dataset, load_local

HOPPER = ("env=hopper", "env.max_episode_steps=60")  # short episodes: seconds


@pytest.fixture(scope="module")
def sb3_agent(tmp_path_factory) -> str:
    """A PPO agent trained for a few hundred steps on Hopper-v5: a real SB3 file, in seconds."""
    import gymnasium as gym
    from stable_baselines3 import PPO

    torch.set_num_threads(1)
    agent = PPO("MlpPolicy", gym.make("Hopper-v5"), n_steps=128, batch_size=64, n_epochs=1, seed=0, device="cpu")
    agent.learn(256)
    path = tmp_path_factory.mktemp("agent") / "ppo-hopper.zip"
    agent.save(path)
    return str(path)


def test_an_sb3_agent_and_a_dtlab_checkpoint_become_datasets_that_train(sb3_agent, make_cfg, tmp_path):
    from dtlab.train import train

    out = tmp_path / "data" / "hopper-ppo.parquet"
    args = (f"policy={sb3_agent}", "noise=0.1", "episodes=6", "seed=7", f"out={out}")
    collect(make_cfg(*HOPPER, *args, config="collect"))
    episodes = episodes_from_dataset(load_local(str(out)))  # the hub schema, read back as training reads it
    assert episodes.num_episodes == 6 and episodes.observations.shape[1] == 11 and episodes.actions.shape[1] == 3
    assert np.abs(episodes.actions).max() <= 1.0  # noisy actions clipped to the action space
    stats = json.loads((out.parent / "datasets.json").read_text())["hopper-ppo"]
    assert stats["episodes"] == 6 and stats["transitions"] == int(episodes.lengths.sum()) and stats["seed"] == 7
    assert stats["behavior"] == "ppo@0.1" and stats["return_mean"] == pytest.approx(episodes.returns.mean(), rel=1e-5)
    # dones: true terminations only, at an episode's last step; an episode cut by the time limit has none
    ends = episodes.starts + episodes.lengths - 1
    dones = load_local(str(out))["dones"]
    for i, d in enumerate(dones):
        assert not any(d[:-1]) and d[-1] == (episodes.lengths[i] < 60)
    assert stats["terminations"] == sum(d[-1] for d in dones) and len(ends) == 6

    # the dataset trains a DT (dataset=local), and that checkpoint collects a dataset in turn
    train(make_cfg("debug=smoke", *HOPPER, "dataset=local", f"dataset.path={out}", "logger=none"))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    again = tmp_path / "data" / "hopper-dt.parquet"
    collect(make_cfg(*HOPPER, f"policy={ckpt}", "epsilon=0.5", "episodes=3", f"out={again}", config="collect"))
    table = json.loads((again.parent / "datasets.json").read_text())
    assert set(table) == {"hopper-ppo", "hopper-dt"} and table["hopper-dt"]["behavior"] == "last.ckpt@0+eps0.5"
    assert episodes_from_dataset(load_local(str(again))).num_episodes == 3


def test_an_exported_onnx_policy_collects_what_its_checkpoint_does(make_cfg, tmp_path):
    from dtlab.export import export
    from dtlab.train import train

    train(make_cfg("debug=smoke", "logger=none", "eval.final_episodes=0"))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    onnx = export(make_cfg(f"ckpt_path={ckpt}", f"out={tmp_path / 'policy.onnx'}", config="export"))
    short = ("env=halfcheetah", "env.max_episode_steps=30", "episodes=2")
    returns = {}
    for name, policy in (("ckpt", ckpt), ("onnx", onnx)):
        collect(make_cfg(*short, f"policy={policy}", f"out={tmp_path / name}.parquet", config="collect"))
        returns[name] = episodes_from_dataset(load_local(str(tmp_path / f"{name}.parquet"))).returns
    # the same policy (float32 kernels apart, 1e-7 an action), so the same 30-step returns
    np.testing.assert_allclose(returns["onnx"], returns["ckpt"], rtol=1e-3)


def test_mixture_shares_split_the_episodes_in_whole_numbers():
    assert episode_counts([1] * 7, 140) == [20] * 7  # hopper-mixed: equal shares
    assert episode_counts([1, 1, 1], 10) == [4, 3, 3] and sum(episode_counts([0.2, 0.3, 0.5], 11)) == 11
    with pytest.raises(DTLabError, match="shares"):
        episode_counts([0, 0], 10)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("recipe=hopper-mixed", "out=x.parquet"), "recipe hopper-mixed-v5 rolls out the RL Zoo's agents: give"),
        (("recipe=halfcheetah-medium-replay", "out=x.parquet"), "a SAC run's replay buffer"),
        (("out=x.parquet",), "give policy=PATH (a .ckpt, .onnx, SB3 .zip or random) or recipe=NAME"),
        (("policy=random",), "give out=PATH.parquet"),
        (("policy=agent.zip", "out=x.parquet"), "agent.zip does not exist"),
    ],
)
def test_what_cannot_be_collected_is_said_in_one_line(make_cfg, overrides, message):
    with pytest.raises(DTLabError, match=re.escape(message)):
        collect(make_cfg(*overrides, config="collect"))


def test_every_recipe_composes_and_names_its_behaviours(make_cfg):
    from pathlib import Path

    from dtlab.cli import CONF_DIR

    recipes = sorted(p.stem for p in (Path(CONF_DIR) / "recipe").glob("*.yaml"))
    assert len(recipes) == 11  # the ten results datasets and halfcheetah-random
    for name in recipes:
        cfg = make_cfg(f"recipe={name}", "agents_dir=/agents", config="collect")
        assert cfg.name == f"{name}-v5" and cfg.env.id.lower().startswith(name.split("-")[0])
        if not cfg.get("unavailable"):
            paths = [b.path for b in cfg.behaviours]
            assert all(p == "random" or p.startswith("/agents/") and p.endswith("-v3.zip") for p in paths), name


def test_a_collected_dataset_is_also_a_minari_dataset(make_cfg, tmp_path, monkeypatch, request):
    pytest.importorskip("minari")
    from dtlab.data import _minari_env, load_minari, minari_env

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    _minari_env.cache_clear()  # an env read from another store must not answer for this one...
    request.addfinalizer(_minari_env.cache_clear)  # ...nor this store's for later tests
    out = tmp_path / "hopper-random.parquet"
    args = ("policy=random", "episodes=4", "minari=true", f"out={out}")
    collect(make_cfg(*HOPPER, *args, config="collect"))
    parquet = episodes_from_dataset(load_local(str(out)))
    minari = episodes_from_dataset(load_minari("dtlab/hopper-random-v0"))  # read back through dataset=minari's loader
    np.testing.assert_array_equal(minari.lengths, parquet.lengths)
    np.testing.assert_allclose(minari.observations, parquet.observations, rtol=1e-6)
    np.testing.assert_allclose(minari.returns, parquet.returns, rtol=1e-5)
    assert minari_env("dtlab/hopper-random-v0")["ref_max_score"] == pytest.approx(3234.3)
