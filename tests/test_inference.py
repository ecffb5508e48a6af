"""Inference backends give eager's actions, and exported policies run without dtlab."""

import json
import logging

import numpy as np
import pytest
import torch
from conftest import random_module

from dtlab.inference import BackendPolicy, export_policy, for_rollout, resolve_backend
from dtlab.module import DTModule
from dtlab.policy import Policy
from dtlab.rollout import rollout

pytest.importorskip("onnxruntime")
ENV = {
    "id": "HalfCheetah-v5",
    "obs_dim": 17,
    "act_dim": 6,
    "max_episode_steps": 100,
    "ref_min_score": -280.178953,
    "ref_max_score": 12135.0,
}
BACKENDS = ["jit", "onnxruntime"]


def module(policy: str = "dt", **options) -> DTModule:
    return random_module(context_length=8, n_embd=32, policy=policy, **options).eval()


@pytest.fixture(scope="module", params=["dt", "mlp_bc"])
def recorded(request):
    """An eager rollout of 2 targets x 2 episodes, 100 steps, and every window it fed the model."""
    dt = module(request.param)
    calls = []
    hook = dt.model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(args), with_kwargs=True)
    try:
        result = rollout(Policy.from_module(dt), ENV, [1000.0, 5000.0], 2, seed=1, progress=False, backend="eager")
    finally:
        hook.remove()
    return dt, result, calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_actions_equal_eager_on_a_real_rollouts_windows(recorded, backend):
    dt, _, calls = recorded
    policy = Policy.from_module(dt)
    fast = BackendPolicy(policy, backend, batch=4)
    worst = 0.0
    for states, actions, returns_to_go, timesteps, mask in (c[:5] for c in calls):
        full_mask = torch.ones(states.shape[:2], dtype=torch.bool) if mask is None else mask  # padded steps too
        window = {"states": states, "actions": actions, "returns_to_go": returns_to_go, "timesteps": timesteps}
        with torch.no_grad():
            eager = dt.model(states, actions, returns_to_go, timesteps, mask, last_only=True)
            worst = max(worst, (fast.act(window | {"mask": full_mask}) - eager).abs().max().item())
    assert len(calls) == 100 and worst <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_rollout_returns_equal_eager_over_100_steps(recorded, backend):
    dt, eager, _ = recorded
    fast = rollout(Policy.from_module(dt), ENV, [1000.0, 5000.0], 2, seed=1, progress=False, backend=backend)
    # the same to float rounding: actions within ~1e-6 move MuJoCo's returns by ~1e-6 at most here
    np.testing.assert_allclose(
        [e["return"] for e in fast["episodes"]], [e["return"] for e in eager["episodes"]], rtol=1e-6, atol=1e-5
    )


def test_auto_is_the_measured_fastest_and_a_missing_onnxruntime_falls_back(monkeypatch, caplog):
    import importlib.util

    import dtlab.inference

    threads = {"n": 1}
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads["n"])
    assert resolve_backend("auto", torch.device("cpu")) == "onnxruntime"  # benchmarks/eval_throughput.py
    assert resolve_backend("auto", torch.device("meta")) == "eager"  # nothing measured off CPU
    threads["n"] = 2
    assert resolve_backend("auto", torch.device("cpu")) == "eager"  # not measured faster at 2 threads
    assert resolve_backend("onnxruntime", torch.device("cpu")) == "onnxruntime"  # named, it is used
    threads["n"] = 1
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else find_spec(name))
    monkeypatch.setattr(dtlab.inference, "_said", set())
    for backend in ("auto", "onnxruntime"):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            for _ in range(3):  # as every evaluation of a run asks
                assert resolve_backend(backend, torch.device("cpu")) == "eager"  # jit measured slower than eager
        assert len(caplog.records) == 1 and "onnxruntime not installed" in caplog.text
    assert isinstance(for_rollout(Policy.from_module(module()), "eager", 2), Policy)


@pytest.mark.parametrize("policy", ["dt", "mlp_bc"])
def test_onnxruntime_rebuilt_after_a_weight_update_runs_the_new_weights(policy):
    """The ONNX graph is exported once per model and gets each evaluation's weights."""
    dt = module(policy)
    first = BackendPolicy(Policy.from_module(dt), "onnxruntime", batch=3)
    with torch.no_grad():
        for p in dt.model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a training step's worth of change, and more
    second = BackendPolicy(Policy.from_module(dt), "onnxruntime", batch=3)
    g = torch.Generator().manual_seed(0)
    window = {
        "states": torch.randn(3, 8, 17, generator=g),
        "actions": torch.rand(3, 8, 6, generator=g) * 2 - 1,
        "returns_to_go": torch.randn(3, 8, generator=g),
        "timesteps": torch.arange(8).expand(3, 8),
        "mask": torch.arange(8)[None] >= torch.tensor([[7], [3], [0]]),  # padded and full windows
    }
    with torch.no_grad():
        eager = dt.model(*window.values(), last_only=True)
    assert (second.act(window) - eager).abs().max().item() <= 1e-5
    assert (first.act(window) - eager).abs().max().item() > 1e-3  # the first session kept its own weights


def test_a_backend_that_is_not_eagers_function_runs_eager(monkeypatch, caplog):
    import dtlab.inference

    dt = module()
    monkeypatch.setattr(dtlab.inference, "_onnx_session", lambda core, example: lambda *x: core(*x) + 1e-4)
    with caplog.at_level(logging.WARNING):
        assert isinstance(for_rollout(Policy.from_module(dt), "onnxruntime", 2), Policy)
    assert "(its actions differ from eager's by 1.0e-04 > 1e-5): using eager" in caplog.text


@pytest.mark.parametrize("timesteps", [True, False])  # False: the default run's DT, no timestep table
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_exported_policy_gives_acts_actions(tmp_path, fmt, timesteps):
    dt = module(timestep_embedding=timesteps, return_init="gpt2" if timesteps else "torch")
    out = export_policy(Policy.from_module(dt), fmt, tmp_path / f"policy.{fmt}", {"context_length": 8})
    metadata = json.loads((tmp_path / f"policy.{fmt}.json").read_text())
    assert metadata["context_length"] == 8
    if fmt == "onnx":  # the inputs the file takes
        assert ("timesteps" in metadata["inputs"]) == timesteps and "observations" in metadata["inputs"]
    rng = np.random.default_rng(3)
    for T in (1, 5, 12):  # padded, padded, a full window of the last 8 steps
        obs, act = rng.normal(size=(T, 17)).astype(np.float32), rng.uniform(-1, 1, (T, 6)).astype(np.float32)
        act[-1] = 0
        rtg, steps = (5000 - 10 * np.arange(T)).astype(np.float32), np.arange(T)
        expected = dt.act(obs, act, rtg, steps)
        first, pad = max(T - 8, 0), 8 - min(T, 8)
        window = {
            "observations": np.concatenate([np.zeros((pad, 17), np.float32), obs[first:]])[None],
            "actions": np.concatenate([np.zeros((pad, 6), np.float32), act[first:]])[None],
            "returns_to_go": np.concatenate([np.zeros(pad, np.float32), rtg[first:]])[None],
            "timesteps": np.concatenate([np.zeros(pad, np.int64), steps[first:]])[None],
            "mask": (np.arange(8) >= pad)[None],
        }
        if fmt == "onnx":
            import onnxruntime as ort

            session = ort.InferenceSession(str(out))
            action = session.run(["action"], {i.name: window[i.name] for i in session.get_inputs()})[0][0]
        else:
            loaded = torch.jit.load(str(out))
            action = loaded(*(torch.from_numpy(window[k]) for k in window))[0].numpy()
        np.testing.assert_allclose(action, expected, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_backend_rollout_leaves_the_model_in_its_mode(backend):
    dt = module().train()  # as in training: the evaluation callback rolls out mid-fit
    rollout(Policy.from_module(dt), ENV | {"max_episode_steps": 5}, [1000.0], 1, progress=False, backend=backend)
    assert dt.model.training  # dropout stays on for the training steps after an evaluation
