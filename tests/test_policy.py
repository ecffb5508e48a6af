"""The one window builder: what a rollout feeds the model equals what training shows it."""

import numpy as np
import pytest
import torch
from conftest import random_module

from dtlab import DTLabError
from dtlab.data import WindowSampler, episodes_from_dataset, episodes_to_dataset
from dtlab.module import DTModule
from dtlab.policy import Policy
from dtlab.rollout import rollout

K = 4
T = 30
ENV = {
    "id": "HalfCheetah-v5",
    "obs_dim": 17,
    "act_dim": 6,
    "max_episode_steps": T,
    "ref_min_score": -280.178953,
    "ref_max_score": 12135.0,
}
TARGETS = [10.0, 50.0]


def module(reward_scale: float = 1.0) -> DTModule:
    # reward_scale 1 and small targets: a one-step shift of the returns-to-go (one reward,
    # ~0.01-1 here) stands far above float32 rounding of the values.
    return random_module(reward_scale=reward_scale, context_length=K, n_embd=16)


@pytest.fixture(scope="module")
def recorded():
    """A rollout of 2 targets x 1 episode, with every input the model was called with."""
    dt = module()
    calls = []
    hook = dt.model.register_forward_pre_hook(lambda m, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    try:
        result = rollout(Policy.from_module(dt), ENV, TARGETS, episodes=1, seed=3, record=True, progress=False)
    finally:
        hook.remove()
    return dt, result, calls


def model_inputs(call, i: int) -> dict[str, torch.Tensor]:
    states, actions, returns_to_go, timesteps, mask = call[0][:5]
    if mask is None:  # nothing padded
        mask = torch.ones(states.shape[:2], dtype=torch.bool)
    return {
        "states": states[i],
        "actions": actions[i],
        "returns_to_go": returns_to_go[i],
        "timesteps": timesteps[i],
        "mask": mask[i],
    }


def training_sampler(dt: DTModule, trajectories: dict, i: int) -> tuple[WindowSampler, float]:
    """The training sampler over env i's recorded episode, as if it were a dataset; and the
    episode's return."""
    obs, act, rew = (trajectories[k][i] for k in ("observations", "actions", "rewards"))
    dataset = episodes_to_dataset(obs, act, rew, np.zeros(len(rew), bool), np.array([len(rew)]))
    episodes = episodes_from_dataset(dataset)
    sampler = WindowSampler(
        episodes, K, dt.reward_scale, dt.state_mean.numpy(), dt.state_std.numpy(), max_ep_len=dt.hparams.max_ep_len
    )
    return sampler, float(episodes.returns[0])


@pytest.mark.parametrize("i", range(len(TARGETS)))
def test_rollout_feeds_the_model_what_the_training_sampler_builds(recorded, i):
    dt, result, calls = recorded
    traj = result["trajectories"]
    assert len(calls) == T and traj["alive"][i].all()  # HalfCheetah never ends early
    sampler, achieved = training_sampler(dt, traj, i)
    offset = (TARGETS[i] - achieved) * dt.reward_scale  # rollout's returns-to-go minus the data's
    dt.model.eval()
    for t, call in enumerate(calls):
        fed = model_inputs(call, i)
        first = max(t - K + 1, 0)
        n = t - first + 1  # real steps in the rollout's window: first..t, left-padded to K
        assert not fed["mask"][: K - n].any() and (fed["states"][: K - n] == 0).all()
        window = sampler.windows(torch.tensor([0]), torch.tensor([first]))  # training's, from the same step
        fed = {k: v[K - n :] for k, v in fed.items()}
        built = {k: v[0, :n] for k, v in window.items()}
        assert torch.equal(fed["states"], built["states"]), t
        # the last action is the one being chosen: the model never sees it (causal, and dropped)
        assert torch.equal(fed["actions"][:-1], built["actions"][:-1]), t
        assert torch.equal(fed["timesteps"], built["timesteps"]), t
        assert fed["mask"].all() and built["mask"].all()
        difference = (fed["returns_to_go"] - built["returns_to_go"]).double().numpy()
        np.testing.assert_allclose(difference, offset, atol=1e-4, err_msg=f"step {t}")
        if t < K - 1:  # the padded window acts as position t of the unpadded training window
            conditioned = window["returns_to_go"] + offset
            with torch.no_grad():
                out = dt.model(window["states"], window["actions"], conditioned, window["timesteps"], window["mask"])
            np.testing.assert_allclose(traj["actions"][i, t], out[0, t].numpy(), atol=1e-5, err_msg=f"step {t}")


def test_act_is_the_rollouts_window_too(recorded):
    dt, result, _ = recorded
    traj, t = result["trajectories"], 10
    rtg = TARGETS[0] - np.concatenate([[0.0], np.cumsum(traj["rewards"][0, :t])])
    actions = np.concatenate([traj["actions"][0, :t], np.zeros((1, 6))])
    action = dt.act(traj["observations"][0, : t + 1], actions, rtg, np.arange(t + 1))
    np.testing.assert_allclose(action, traj["actions"][0, t], atol=1e-6)


def test_a_horizon_past_the_timestep_table_is_refused():
    dt = module()
    with pytest.raises(DTLabError, match="env.max_episode_steps=1001 reaches timestep 1000, but .* 1000 rows"):
        rollout(Policy.from_module(dt), ENV | {"max_episode_steps": 1001}, [10.0], 1, progress=False)
    with pytest.raises(DTLabError, match="act: timesteps reaches timestep 1000"):
        dt.act(np.zeros((1, 17)), np.zeros((1, 6)), np.zeros(1), np.array([1000]))


def test_act_refuses_an_empty_history_and_negative_timesteps():
    dt = module()
    with pytest.raises(DTLabError, match="at least one step, with timesteps >= 0"):
        dt.act(np.zeros((0, 17)), np.zeros((0, 6)), np.zeros(0), np.zeros(0, dtype=int))
    with pytest.raises(DTLabError, match="timesteps >= 0"):
        dt.act(np.zeros((1, 17)), np.zeros((1, 6)), np.zeros(1), np.array([-1]))


def test_a_model_without_a_timestep_table_takes_any_horizon():
    # a table of 10 rows, unused: nothing refers to timestep 10 or later in a model without one
    for options in ({"timestep_embedding": False}, {"policy": "mlp_bc"}):
        policy = random_module(max_ep_len=10, context_length=K, n_embd=16, **options)
        result = rollout(Policy.from_module(policy), ENV | {"max_episode_steps": 15}, [10.0], 1, progress=False)
        assert result["episodes"][0]["length"] == 15
        action = policy.act(np.zeros((1, 17)), np.zeros((1, 6)), np.zeros(1), np.array([20]))
        assert action.shape == (6,) and np.isfinite(action).all()
