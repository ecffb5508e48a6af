"""Every data source, built for real on this machine, trained through the CLI."""

import os
import subprocess
import sys

import datasets
import gymnasium as gym
import huggingface_hub
import numpy as np
import pytest
from conftest import drawn_episodes

from dtlab import DTLabError
from dtlab.data import WindowSampler, dataset_report, episodes_from_dataset, episodes_to_dataset, load_hub, load_mixture

LENGTH = 40  # steps per collected episode


def collect(episodes: int, seed: int = 0) -> list[dict]:
    """Our own small data collector: random actions in HalfCheetah-v5, Minari's layout
    (T+1 observations per episode)."""
    env = gym.make("HalfCheetah-v5", max_episode_steps=LENGTH)
    env.action_space.seed(seed)
    out = []
    for e in range(episodes):
        obs, _ = env.reset(seed=seed + e)
        o, a, r, term, trunc = [obs], [], [], [], []
        done = False
        while not done:
            action = env.action_space.sample()
            obs, reward, terminated, truncated, _ = env.step(action)
            o.append(obs), a.append(action), r.append(reward), term.append(terminated), trunc.append(truncated)
            done = terminated or truncated
        out.append(
            {
                "observations": np.array(o),
                "actions": np.array(a),
                "rewards": np.array(r),
                "terminations": np.array(term),
                "truncations": np.array(trunc),
            }
        )
    env.close()
    return out


def train_cli(tmp_path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "dtlab.train",
        "debug=smoke",
        "trainer.max_steps=4",
        "logger=csv",
        f"hydra.run.dir={tmp_path / 'run'}",
        *overrides,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    return result


def test_minari_dataset_trains_with_its_own_env_and_reference_scores(tmp_path, monkeypatch, request):
    minari = pytest.importorskip("minari")
    from minari.data_collector import EpisodeBuffer

    from dtlab.data import _minari_env

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    _minari_env.cache_clear()  # an env read from another store must not answer for this one...
    request.addfinalizer(_minari_env.cache_clear)  # ...nor this store's for later tests
    episodes = collect(3)
    buffers = [EpisodeBuffer(id=i, seed=i, **e) for i, e in enumerate(episodes)]
    minari.create_dataset_from_buffers(
        "test/halfcheetah/random-v0",
        buffers,
        env=gym.make("HalfCheetah-v5", max_episode_steps=LENGTH),
        algorithm_name="random",
        ref_min_score=-300.0,
        ref_max_score=1000.0,
    )
    from dtlab.data import load_minari, minari_env

    loaded = episodes_from_dataset(load_minari("test/halfcheetah/random-v0"))
    np.testing.assert_array_equal(loaded.lengths, [LENGTH] * 3)
    np.testing.assert_allclose(loaded.observations[:LENGTH], episodes[0]["observations"][:-1], rtol=1e-6)  # T, not T+1
    assert minari_env("test/halfcheetah/random-v0")["ref_max_score"] == 1000.0
    result = train_cli(
        tmp_path,
        "dataset=minari",
        "dataset.name=test/halfcheetah/random-v0",
        "env=from_dataset",
        "env.max_episode_steps=20",  # within the dataset's 40-step limit, the model's table
        "model.context_length=4",
        env={"MINARI_DATASETS_PATH": str(tmp_path / "minari")},
    )
    assert "source" in result.stdout + result.stderr  # the dataset report
    from dtlab.module import DTModule

    module = DTModule.load_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert module.env_config["ref_min_score"] == -300.0 and module.env_config["id"] == "HalfCheetah-v5"


def test_d4rl_hdf5_is_split_on_terminals_and_timeouts(tmp_path):
    h5py = pytest.importorskip("h5py")
    episodes = collect(3)
    steps = {k: np.concatenate([e[k] for e in episodes]) for k in ("actions", "rewards")}
    path = tmp_path / "halfcheetah_random.hdf5"
    with h5py.File(path, "w") as f:
        f["observations"] = np.concatenate([e["observations"][:-1] for e in episodes])
        f["actions"], f["rewards"] = steps["actions"], steps["rewards"]
        f["terminals"] = np.zeros(3 * LENGTH, dtype=bool)
        timeouts = np.zeros(3 * LENGTH, dtype=bool)
        timeouts[[LENGTH - 1, 2 * LENGTH - 1, 2 * LENGTH + 9]] = True  # the third episode cut at step 10...
        f["timeouts"] = timeouts  # ...and its last 30 steps, unterminated, are dropped
    from dtlab.data import load_hdf5

    loaded = episodes_from_dataset(load_hdf5(str(path)))
    np.testing.assert_array_equal(loaded.lengths, [LENGTH, LENGTH, 10])
    np.testing.assert_allclose(loaded.returns[0], episodes[0]["rewards"].sum(), rtol=1e-5)
    train_cli(tmp_path, "dataset=d4rl_hdf5", f"dataset.path={path}", "model.context_length=4")


def test_weighted_mixture_trains_and_samples_by_weight(tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    for path, seed in ((a, 0), (b, 10)):
        eps = collect(2, seed)
        episodes_to_dataset(
            np.concatenate([e["observations"][:-1] for e in eps]),
            np.concatenate([e["actions"] for e in eps]),
            np.concatenate([e["rewards"] for e in eps]),
            np.concatenate([e["terminations"] for e in eps]),
            [LENGTH] * 2,
        ).to_parquet(path)
    train_cli(
        tmp_path,
        "dataset=mixture",
        f"dataset.sources.medium.path={a}",
        f"dataset.sources.expert.path={b}",
        "dataset.weights={medium: 0.9, expert: 0.1}",
        "model.context_length=4",
    )

    from functools import partial

    from dtlab.data import load_local

    mixed = episodes_from_dataset(
        load_mixture({"a": partial(load_local, str(a)), "b": partial(load_local, str(b))}, {"a": 0.9, "b": 0.1})
    )
    assert list(mixed.sources) == ["a", "a", "b", "b"]
    sampler = WindowSampler(mixed, 4, 0.001, np.zeros(17), np.ones(17), 1000)
    drawn = drawn_episodes(sampler, mixed, 10_000)
    assert abs((drawn < 2).mean() - 0.9) < 0.015
    report = dataset_report(mixed, (-280.0, 12135.0))
    assert [r["source"] for r in report] == ["a", "b", "all"] and report[2]["episodes"] == 4
    with pytest.raises(DTLabError, match="give one weight each"):
        load_mixture({"a": partial(load_local, str(a))}, {"b": 1.0})


def test_hub_offline_without_cache_says_how_to_fetch(monkeypatch, tmp_path):
    # datasets reads HF_DATASETS_OFFLINE and its cache paths at import (conftest sets the
    # former first), so an empty cache is patched in, not set in the environment.
    assert datasets.config.HF_DATASETS_OFFLINE, "this test must not reach the network"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(
        DTLabError,
        match="could not load .* config 'hopper-medium-v2'.*HF_DATASETS_OFFLINE=1 works",
    ):
        load_hub("hopper-medium-v2")
