"""The Online Decision Transformer (algo=odt): the squashed Gaussian, the temperature, the replay
buffer, and real tiny runs (debug=smoke) that go offline -> online -> final evaluation, collect
in a real env, train on what they collected and resume exactly."""

import copy
import importlib.util
import json
import math
from pathlib import Path

import gymnasium as gym
import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import compose_cfg, random_module
from torch import distributions as D

from dtlab.callbacks import OnlineFinetuning
from dtlab.data import Episodes, episodes_from_dataset, episodes_to_dataset
from dtlab.datamodule import TrajectoryDataModule
from dtlab.model import squashed_log_prob
from dtlab.module import DTModule
from dtlab.policy import Policy, normalize_states
from dtlab.replay import OFFLINE, ONLINE, ReplayBuffer, Trajectory
from dtlab.report import _online_curve, build_report, plot_figures, to_record
from dtlab.train import train

# ---------------------------------------------------------------------------------------------
# The squashed Gaussian and the temperature.


def closed_form(u: np.ndarray, mu: np.ndarray, std: np.ndarray) -> np.ndarray:
    """log pi(tanh u) in float64 from its definition: log N(u; mu, std) - log(1 - tanh(u)^2),
    with log(1 - tanh(u)^2) = log sech(u)^2 = -2 log cosh(u) = -2 (|u| + log1p(e^(-2|u|)) - log 2)."""
    log_normal = -0.5 * ((u - mu) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)
    log_sech2 = -2.0 * (np.abs(u) + np.log1p(np.exp(-2.0 * np.abs(u))) - np.log(2.0))
    return (log_normal - log_sech2).sum(axis=-1)


def test_squashed_gaussian_log_prob_is_the_closed_form_up_to_the_bounds():
    rng = np.random.default_rng(0)
    mu, std = rng.normal(size=(64, 3)), rng.uniform(0.05, 2.0, size=(64, 3))
    # actions across (-1, 1), as pre-tanh u; then at the bounds: float32 tanh(u) rounds to
    # +-1 from |u| ~ 9 on, where 1 - tanh(u)^2 is 0 and its log -inf
    u = np.concatenate([rng.normal(scale=1.5, size=(64, 3)), np.full((8, 3), 12.0), np.full((8, 3), -20.0)])
    mu, std = np.concatenate([mu, mu[:16]]), np.concatenate([std, std[:16]])
    t = {k: torch.tensor(v, dtype=torch.float32) for k, v in {"u": u, "mu": mu, "log_std": np.log(std)}.items()}
    ours = squashed_log_prob(t["u"], t["mu"], t["log_std"]).double().numpy()
    np.testing.assert_allclose(ours, closed_form(u, mu, std), rtol=1e-5, atol=1e-3)
    assert np.isfinite(ours).all() and not torch.isfinite(1 - torch.tanh(t["u"][-1]) ** 2).log().all()
    # and torch's TanhTransform distribution agrees where it is finite (inside the bounds)
    inside = slice(0, 64)
    dist = D.TransformedDistribution(
        D.Normal(t["mu"][inside].double(), t["log_std"][inside].double().exp()), [D.TanhTransform()]
    )
    a = torch.tanh(t["u"][inside].double())
    np.testing.assert_allclose(ours[inside], dist.log_prob(a).sum(-1).numpy(), rtol=1e-5, atol=1e-4)


def test_dataset_actions_at_the_bounds_give_a_finite_likelihood():
    module = random_module(state_dim=3, act_dim=2, state_mean=[0.0] * 3, state_std=[1.0] * 3, action_head="gaussian")
    batch = synthetic_datamodule(actions_at_bounds=True).batch_at(0)
    assert (batch["actions"].abs() == 1.0).any()
    module.on_train_batch_start(batch, 0)
    losses = module._likelihood_losses(batch)
    assert all(torch.isfinite(v) for v in losses.values())


def synthetic_datamodule(actions_at_bounds: bool = False) -> TrajectoryDataModule:
    rng = np.random.default_rng(0)
    lengths = np.array([20, 30, 25])
    n = lengths.sum()
    actions = rng.uniform(-1, 1, (n, 2))
    if actions_at_bounds:
        actions[::3] = np.sign(actions[::3])
    data = episodes_to_dataset(rng.normal(size=(n, 3)), actions, rng.normal(size=n), np.zeros(n, bool), lengths)
    dm = TrajectoryDataModule(episodes_from_dataset(data), 100, 5, batch_size=16, val_fraction=0.0)
    dm.setup()
    return dm


class TemperatureTrace(L.Callback):
    def __init__(self) -> None:
        self.log_alpha: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.log_alpha.append(float(pl_module.log_alpha))


def fit_temperature(target_entropy: float, steps: int = 6) -> tuple[list[float], float]:
    dm = synthetic_datamodule()
    module = DTModule(
        "HalfCheetah-v5", 3, 2, 100, dm.state_mean.tolist(), dm.state_std.tolist(), 0.001, context_length=5,
        n_layer=1, n_embd=16, warmup_steps=100, action_head="gaussian", target_entropy=target_entropy,
    )  # fmt: skip
    trace = TemperatureTrace()
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", gradient_clip_val=0.25, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[trace],
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    return [math.log(0.1), *trace.log_alpha], float(trainer.callback_metrics["train/entropy"])


def test_the_temperature_rises_below_the_target_entropy_and_falls_above_it():
    # a 2-dim squashed Gaussian has entropy below 2 log 2: a target of 5 is never reached, -50 always
    below, entropy = fit_temperature(target_entropy=5.0)
    above, _ = fit_temperature(target_entropy=-50.0)
    assert entropy < 5.0
    assert all(b > a for a, b in zip(below, below[1:], strict=False))  # rises every step
    assert all(b < a for a, b in zip(above, above[1:], strict=False))  # falls every step
    # Adam moves a parameter by ~its rate a step under a steady gradient: the temperature's rate is
    # model.temperature_lr (1e-4), constant, not the policy's warmup (step 1 of 100: 1e-6)
    assert below[-1] - below[0] == pytest.approx(6 * 1e-4, rel=0.25)


def test_clipping_keeps_the_temperatures_gradient_out_of_the_policys_norm():
    module = random_module(state_dim=3, act_dim=2, state_mean=[0.0] * 3, state_std=[1.0] * 3, action_head="gaussian")
    module.hparams.target_entropy = 50.0  # far above: a large temperature gradient, alpha (H - 50)
    batch = synthetic_datamodule().batch_at(0)
    module.on_train_batch_start(batch, 0)
    losses = module._likelihood_losses(batch)
    (losses["policy"] + losses["temperature"]).backward()
    policy = [p for p in module.model.parameters() if p.grad is not None]
    before = torch.nn.utils.get_total_norm([p.grad for p in policy]).item()
    alpha_grad = module.log_alpha.grad.clone()
    assert abs(alpha_grad.item()) > 1.0 and before > 0.25  # both above the 0.25 limit
    module.configure_gradient_clipping(None, gradient_clip_val=0.25, gradient_clip_algorithm="norm")
    assert torch.nn.utils.get_total_norm([p.grad for p in policy]).item() == pytest.approx(0.25, rel=1e-4)
    assert torch.equal(module.log_alpha.grad, alpha_grad)  # the temperature's own step is its own


def test_the_gaussian_policy_acts_with_its_mean_through_every_backend(tmp_path):
    from dtlab.inference import BackendPolicy
    from dtlab.rollout import rollout

    module = random_module(action_head="gaussian", context_length=4, n_embd=16)
    module.eval()
    env = {"id": "HalfCheetah-v5", "obs_dim": 17, "act_dim": 6, "max_episode_steps": 8}
    env |= {"ref_min_score": -280.0, "ref_max_score": 12135.0}
    result = rollout(Policy.from_module(module), env, [6000.0], 1, record=True, progress=False)
    traj = result["trajectories"]
    obs, actions = traj["observations"][0], traj["actions"][0]
    rtg = 6000.0 - np.concatenate([[0.0], np.cumsum(traj["rewards"][0])])[:-1]
    t = 5
    window_actions = np.concatenate([actions[:t], np.zeros((1, 6))])
    mean = module.act(obs[: t + 1], window_actions, rtg[: t + 1], np.arange(t + 1))
    np.testing.assert_allclose(actions[t], mean, atol=1e-6)  # the rollout acted with the mean
    s = Policy.from_module(module).normalize(obs[None, t - 3 : t + 1])
    window = {"states": s, "actions": torch.as_tensor(window_actions[None, -4:], dtype=torch.float32)}
    window |= {"returns_to_go": Policy.from_module(module).scale(rtg[None, t - 3 : t + 1])}
    window |= {"timesteps": torch.arange(t - 3, t + 1)[None], "mask": torch.ones(1, 4, dtype=torch.bool)}
    with torch.no_grad():
        mu, _ = module.model.action_distribution(
            *(window[k] for k in ("states", "actions", "returns_to_go", "timesteps"))
        )
    np.testing.assert_allclose(mean, torch.tanh(mu[0, -1]).numpy(), atol=1e-6)
    for backend in ("jit", "onnxruntime"):
        if backend == "onnxruntime" and importlib.util.find_spec("onnxruntime") is None:
            continue
        action = BackendPolicy(Policy.from_module(module), backend, 1).act(window)
        np.testing.assert_allclose(np.asarray(action)[0], mean, atol=1e-5)
    # exploration samples: other actions than the mean, the same ones for the same seed
    sampled = [rollout(Policy.from_module(module), env, [6000.0], 1, record=True, progress=False, sample_seed=7)]
    sampled.append(rollout(Policy.from_module(module), env, [6000.0], 1, record=True, progress=False, sample_seed=7))
    a, b = (r["trajectories"]["actions"][0] for r in sampled)
    assert np.array_equal(a, b) and not np.allclose(a, actions, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# The replay buffer.


def offline(returns: list[float]) -> Episodes:
    """Episodes of 2 steps each whose returns are `returns` (rewards r/2, r/2)."""
    rewards = np.repeat(np.asarray(returns, dtype=np.float32) / 2, 2)
    n = len(rewards)
    data = episodes_to_dataset(
        np.arange(n)[:, None] * np.ones((1, 3)), np.zeros((n, 2)), rewards, np.zeros(n, bool), np.full(len(returns), 2)
    )
    return episodes_from_dataset(data)


def online(ret: float, length: int = 3) -> Trajectory:
    """A collected trajectory of return `ret`, all of it in its first reward."""
    rewards = np.zeros(length, np.float32)
    rewards[0] = ret
    return Trajectory(np.zeros((length, 3), np.float32), np.zeros((length, 2), np.float32), rewards)


def test_the_buffer_starts_with_the_best_offline_episodes_and_then_is_fifo_by_trajectory():
    data = offline([5.0, 1.0, 9.0, 3.0, 7.0])
    buffer = ReplayBuffer.from_offline(data, capacity=3)
    assert buffer.returns.tolist() == [5.0, 7.0, 9.0]  # the best 3, lowest (the first to leave) first
    assert [t.source for t in buffer.trajectories] == [OFFLINE] * 3
    np.testing.assert_array_equal(buffer.trajectories[0].observations, data.observations[0:2])  # episode 0 itself
    assert ReplayBuffer.from_offline(data, capacity=10).returns.tolist() == [1.0, 3.0, 5.0, 7.0, 9.0]  # all of them
    buffer.add([online(100.0)])
    assert buffer.returns.tolist() == [7.0, 9.0, 100.0]  # the oldest left, whatever their return
    buffer.add([online(-1.0), online(-2.0)])
    assert buffer.returns.tolist() == [100.0, -1.0, -2.0]  # offline all gone: then the oldest online
    assert [t.source for t in buffer.trajectories] == [ONLINE] * 3
    buffer.add([online(float(r)) for r in range(10, 15)])
    assert buffer.returns.tolist() == [12.0, 13.0, 14.0] and len(buffer) == 3
    # as flat episodes for the window sampler, oldest first; and whole through a checkpoint
    episodes = buffer.episodes()
    assert episodes.returns.tolist() == pytest.approx([12.0, 13.0, 14.0]) and episodes.lengths.tolist() == [3, 3, 3]
    again = ReplayBuffer.from_state_dict(copy.deepcopy(buffer.state_dict()))
    assert again.returns.tolist() == buffer.returns.tolist() and again.capacity == 3
    mixed = ReplayBuffer(4, [*ReplayBuffer.from_offline(data, 2).trajectories, online(8.0)])
    restored = ReplayBuffer.from_state_dict(mixed.state_dict())
    assert [t.source for t in restored.trajectories] == [OFFLINE, OFFLINE, ONLINE]
    for a, b in zip(mixed.trajectories, restored.trajectories, strict=True):
        assert all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("observations", "actions", "rewards"))


# ---------------------------------------------------------------------------------------------
# Real runs: debug=smoke, 20 offline steps, then 2 rounds of 1 HalfCheetah trajectory (50 steps)
# and 5 steps each. A buffer of one trajectory: after round r, every window must come from
# round r's trajectory, and none before.

P, U, ROUNDS = 20, 5, 2
RUN = [
    "debug=smoke",
    "algo=odt",
    "logger=csv",
    "threads=1",
    "trainer.log_every_n_steps=1",
    "callbacks.checkpoint.every_n_train_steps=10",
    f"online.rounds={ROUNDS}",
    f"online.updates_per_round={U}",
    "online.trajectories_per_round=1",
    "online.buffer_size=1",
]


class RecordBatches(L.Callback):
    """Saves every step's batch with the online trajectories in the buffer it was drawn from."""

    def __init__(self, path: str) -> None:
        self.path, self.steps = Path(path), {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        (stage,) = [c for c in trainer.callbacks if isinstance(c, OnlineFinetuning)]
        held = [copy.deepcopy(t) for t in stage.buffer.trajectories if t.source == ONLINE]
        self.steps[trainer.global_step] = {"batch": {k: v.clone() for k, v in batch.items()}, "online": held}

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(self.steps, self.path)


class Preempt(L.Callback):
    """Raises the SIGTERM flag at the end of step `step`, as a cluster's preemption would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            trainer._signal_connector.received_sigterm = True


def fit(out: Path, *overrides: str) -> Path:
    train(compose_cfg(out, *RUN, *overrides))
    return out


def last_checkpoint(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("odt")
    return fit(out, "+callbacks.record._target_=test_odt.RecordBatches", f"+callbacks.record.path={out / 'batches.pt'}")


def test_a_smoke_run_goes_offline_then_online_then_to_the_final_evaluation(straight):
    assert last_checkpoint(straight)["global_step"] == P + ROUNDS * U
    pretrained = torch.load(straight / "checkpoints" / "pretrained.ckpt", map_location="cpu", weights_only=False)
    assert pretrained["global_step"] == P and "log_alpha" in pretrained["state_dict"]
    history = pd.read_csv(straight / "csv" / "version_0" / "metrics.csv").groupby("step").first()
    rounds = history["online/env_steps"].dropna()
    assert rounds.to_dict() == {P: 50.0, P + U: 100.0}  # one 50-step trajectory a round
    for key in ("buffer_return_mean", "collected_return_mean", "entropy", "temperature", "round"):
        assert history[f"online/{key}"].notna().sum() == ROUNDS, key
    for key in ("train/entropy", "train/temperature"):  # every step, pretraining included
        assert history[key].notna().sum() == P + ROUNDS * U, key
    final = json.loads((straight / "final_evaluation.json").read_text())
    steps = {name: c["protocol"]["step"] for name, c in final["checkpoints"].items()}
    assert steps == {"last": P + ROUNDS * U, "best": steps["best"], "pretrained": P}
    assert [h.get("online/env_steps") for h in final["history"]] == [0.0, 0.0, 100.0]  # at steps 10, 20, 30
    assert (
        final["config"]["trainer"]["max_steps"] == P + ROUNDS * U and final["config"]["online"]["pretrain_steps"] == P
    )
    # dtlab.report treats it like any algorithm, pretrained.ckpt as a checkpoint of its own
    record = to_record(final, "odt-smoke")
    groups = build_report([record], [])["groups"]
    assert {(g["algo"], g["checkpoint"]) for g in groups} == {("odt", c) for c in ("last", "best", "pretrained")}
    # and its learning curve against online env steps, from the end of pretraining (steps 20, 30)
    env_steps, scores = _online_curve([record])
    assert env_steps.tolist() == [0.0, 100.0] and scores.shape == (1, 2)
    (figure,) = plot_figures([record], straight)
    assert figure.stat().st_size > 10_000


def test_the_offline_only_control_is_the_same_run_with_nothing_collected(straight, tmp_path):
    control = fit(tmp_path, "online.collect=false", "algo.name=odt_offline")
    checkpoints = {
        (run, name): torch.load(run / "checkpoints" / f"{name}.ckpt", map_location="cpu", weights_only=False)
        for run in (straight, control)
        for name in ("pretrained", "last")
    }
    same = [torch.equal(v, checkpoints[(control, "pretrained")]["state_dict"][k])
            for k, v in checkpoints[(straight, "pretrained")]["state_dict"].items()]  # fmt: skip
    assert all(same)  # the same pretraining, bit for bit
    last = checkpoints[(control, "last")]
    assert last["global_step"] == P + ROUNDS * U  # the same extra steps ...
    (stage,) = [k for k in last["callbacks"] if k.startswith("OnlineFinetuning")]
    assert last["callbacks"][stage]["env_steps"] == 0 and last["callbacks"][stage]["rounds_done"] == ROUNDS
    buffer = ReplayBuffer.from_state_dict(last["callbacks"][stage]["buffer"])
    assert [t.source for t in buffer.trajectories] == [OFFLINE]  # ... on the offline episodes alone
    key = "model.predict_action.weight"
    assert not torch.equal(last["state_dict"][key], checkpoints[(straight, "last")]["state_dict"][key])
    final = json.loads((control / "final_evaluation.json").read_text())
    assert (
        set(final["checkpoints"]) == {"last", "best", "pretrained"} and final["config"]["algo"]["name"] == "odt_offline"
    )


def replay(trajectory: Trajectory, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The env's own observations and rewards for the trajectory's actions from reset(seed)."""
    env = gym.make("HalfCheetah-v5")
    obs, _ = env.reset(seed=seed)
    observations, rewards = [], []
    for action in trajectory.actions:
        observations.append(obs)
        obs, reward, *_ = env.step(action)
        rewards.append(reward)
    return np.array(observations), np.array(rewards)


def windows_rows(batch: dict, states: torch.Tensor) -> torch.Tensor:
    """For every real step of every window, its row among `states` (-1: none matches)."""
    real = batch["states"][batch["mask"]]  # (real steps, obs_dim)
    distance = torch.cdist(real.double(), states.double())
    return torch.where(distance.min(dim=1).values < 1e-6, distance.argmin(dim=1), -1)


def test_collected_trajectories_enter_the_sampled_batches(straight):
    steps = torch.load(straight / "batches.pt", weights_only=False)
    module = DTModule.load_from_checkpoint(straight / "checkpoints" / "last.ckpt", map_location="cpu")
    assert sorted(steps) == list(range(P + ROUNDS * U))
    for step, seen in steps.items():
        r = (step - P) // U  # the round whose trajectory the buffer holds (capacity 1), or < 0
        assert len(seen["online"]) == (1 if r >= 0 else 0), step
        if r < 0:
            continue
        (trajectory,) = seen["online"]
        rows = windows_rows(
            seen["batch"], normalize_states(trajectory.observations, module.state_mean, module.state_std)
        )
        assert (rows >= 0).all(), f"step {step}: windows from elsewhere than round {r}'s trajectory"
    # each round's trajectory is new: round 1's windows are not round 0's
    first, second = (steps[P + r * U]["online"][0].observations for r in range(ROUNDS))
    assert not np.array_equal(first, second)


def test_hindsight_returns_to_go_are_the_reversed_cumulative_sum_of_the_rewards_received(straight):
    steps = torch.load(straight / "batches.pt", weights_only=False)
    module = DTModule.load_from_checkpoint(straight / "checkpoints" / "last.ckpt", map_location="cpu")
    for r in range(ROUNDS):
        (trajectory,) = steps[P + r * U]["online"]
        # the rewards kept are the env's for these actions (round r's env seed: online.seed + r)
        observations, rewards = replay(trajectory, seed=100_000 + r)
        np.testing.assert_allclose(trajectory.observations, observations, atol=1e-6)
        np.testing.assert_allclose(trajectory.rewards, rewards, rtol=1e-6, atol=1e-6)
        expected = np.cumsum(rewards[::-1])[::-1] * module.reward_scale  # R_t = sum of r_t..r_T, scaled
        states = normalize_states(trajectory.observations, module.state_mean, module.state_std)
        for step in range(P + r * U, P + (r + 1) * U):
            batch = steps[step]["batch"]
            t = windows_rows(batch, states)
            np.testing.assert_allclose(batch["returns_to_go"][batch["mask"]].numpy(), expected[t.numpy()], atol=1e-6)
        # not the returns it was conditioned on while collected: 2 x 12000 minus the rewards so far
        assert abs(expected[0] / module.reward_scale - 24_000) > 20_000


def test_a_run_preempted_mid_online_resumes_to_the_weights_of_the_straight_run(straight, tmp_path):
    with pytest.raises(SystemExit) as stopped:  # dtlab.train exits 143 on SIGTERM, last.ckpt saved
        fit(tmp_path, "+callbacks.preempt._target_=test_odt.Preempt", f"+callbacks.preempt.step={P + 3}")
    assert stopped.value.code == 143 and last_checkpoint(tmp_path)["global_step"] == P + 3  # inside round 0
    fit(tmp_path, "ckpt_path=last")  # collects round 1 itself, from the restored buffer and streams
    a, b = last_checkpoint(straight), last_checkpoint(tmp_path)
    assert a["global_step"] == b["global_step"] == P + ROUNDS * U
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for sa, sb in zip(
        a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values(), strict=True
    ):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    (stage,) = [k for k in a["callbacks"] if k.startswith("OnlineFinetuning")]
    buffers = [ReplayBuffer.from_state_dict(c["callbacks"][stage]["buffer"]) for c in (a, b)]
    assert np.array_equal(buffers[0].trajectories[0].observations, buffers[1].trajectories[0].observations)
    assert a["callbacks"][stage]["env_steps"] == b["callbacks"][stage]["env_steps"] == 100
