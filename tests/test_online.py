"""dtlab.online beyond tests/test_odt.py: each run seed explores from env seeds of its own, and
a checkpoint written before issue 34's renames (DTModule, dtlab.callbacks.OnlineFinetuning,
online.checkpoints_dir, exploration seeds that ignored the run seed) loads and resumes as the
run it came from."""

import shutil
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import compose_cfg
from hydra.utils import get_object

from dtlab.checkpoint import load_checkpoint
from dtlab.module import DTModule, PolicyModule
from dtlab.online import ReplayBuffer
from dtlab.train import train

FIXTURES = Path(__file__).parent / "fixtures"
OLD = FIXTURES / "dtlab-0.2.0-odt-pretrained.ckpt"  # pretrained.ckpt (step 4) of the run below, seed 3
# The fixture's run in today's keys (it was written with trainer.max_steps=4, now refused under
# algo=odt): 4 offline steps, then 2 rounds of one 10-step trajectory and 2 steps each
RUN = [
    "debug=smoke",
    "algo=odt",
    "logger=none",
    "threads=1",
    "dataset=local",
    f"dataset.path={FIXTURES / 'dtlab-0.2.0-tiny-episodes.parquet'}",
    "model.n_embd=8",
    "++model.timestep_embedding=false",
    "data.batch_size=4",
    "data.val_fraction=0.25",
    "online.pretrain_steps=4",
    "online.rounds=2",
    "online.updates_per_round=2",
    "online.buffer_size=2",
    "env.max_episode_steps=10",
    "eval.every_n_steps=0",
    "eval.final_episodes=1",
    "eval.episodes=1",
    "seed=3",
    "target_return.values=[10]",
]


def explored_from(run: Path) -> list[int]:
    """The env seed each online trajectory in the buffer of the run's end started from, found
    among online.seed .. + 20 by its first observation. best.ckpt, saved by the one evaluation,
    at the last step: a run resumed from a checkpoint other than a last.ckpt writes its own last
    as last-v1.ckpt beside the adopted copy (Lightning's version counter)."""
    saved = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 8
    (stage,) = [k for k in saved["callbacks"] if k.startswith("OnlineFinetuning")]
    buffer = ReplayBuffer.from_state_dict(saved["callbacks"][stage]["buffer"])
    env = gym.make("HalfCheetah-v5")
    starts = {seed: env.reset(seed=seed)[0] for seed in range(100_000, 100_020)}
    return [next(s for s, obs in starts.items() if np.allclose(t.observations[0], obs)) for t in buffer.trajectories]


def test_a_checkpoint_written_before_the_renames_loads_as_a_policy_module():
    module = load_checkpoint(OLD)
    assert isinstance(module, PolicyModule) and DTModule is PolicyModule
    assert isinstance(DTModule.load_from_checkpoint(OLD, map_location="cpu"), PolicyModule)
    config = torch.load(OLD, map_location="cpu", weights_only=False)["dtlab"]["config"]
    assert (
        config["model"]["_target_"] == "dtlab.module.DTModule"
        and get_object(config["model"]["_target_"]) is PolicyModule
    )
    assert get_object(config["online"]["_target_"]) is get_object("dtlab.online.OnlineFinetuning")


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("resumed")
    ckpt = run / "old.ckpt"
    shutil.copy(OLD, ckpt)
    train(compose_cfg(run / "run", *RUN, f"ckpt_path={ckpt}"))
    return run / "run"


def test_an_old_checkpoint_resumes_exploring_from_the_seeds_it_began_with(resumed):
    # written when round r of every run seed explored from online.seed + r
    assert explored_from(resumed) == [100_000, 100_001]


def test_each_run_seed_explores_from_env_seeds_of_its_own(tmp_path):
    train(compose_cfg(tmp_path, *RUN))
    # seed 3's block of rounds x trajectories_per_round = 2 seeds: 100000 + 3 x 2 on
    assert explored_from(tmp_path) == [100_006, 100_007]
