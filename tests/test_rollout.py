import json
import multiprocessing
import os
import signal
import subprocess
import sys

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from dtlab import DTLabError
from dtlab.evaluate import evaluate
from dtlab.inference import resolve_workers
from dtlab.module import DTModule
from dtlab.policy import Policy
from dtlab.rollout import normalized_score, resolve_targets, rollout
from dtlab.train import train

HALFCHEETAH = {
    "id": "HalfCheetah-v5",
    "obs_dim": 17,
    "act_dim": 6,
    "max_episode_steps": 30,
    "ref_min_score": -280.178953,
    "ref_max_score": 12135.0,
}
HOPPER = {
    "id": "Hopper-v5",
    "obs_dim": 11,
    "act_dim": 3,
    "max_episode_steps": 200,
    "ref_min_score": -20.272305,
    "ref_max_score": 3234.3,
}


def tiny_module(env: dict, K: int = 4, seed: int = 0) -> DTModule:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    return DTModule(
        env_id=env["id"],
        state_dim=env["obs_dim"],
        act_dim=env["act_dim"],
        max_ep_len=1000,
        state_mean=rng.normal(size=env["obs_dim"]).tolist(),
        state_std=rng.uniform(0.5, 2, env["obs_dim"]).tolist(),
        reward_scale=0.001,
        context_length=K,
        n_layer=2,
        n_head=2,
        n_embd=16,
        dropout=0.1,
    )


def test_batched_rollout_equals_the_model_called_one_env_at_a_time():
    module = tiny_module(HALFCHEETAH, K=4)
    result = rollout(
        Policy.from_module(module), HALFCHEETAH, [1000.0, 5000.0], episodes=2, seed=3, record=True, progress=False
    )
    traj = result["trajectories"]
    n, T = traj["actions"].shape[:2]
    assert (n, T) == (4, 30)
    assert module.training  # train mode restored
    for i in range(n):  # the slow reference: act() on each env's raw history, step by step
        target = result["episodes"][i]["target"]
        for t in range(T):
            rtg = target - np.concatenate([[0.0], np.cumsum(traj["rewards"][i, :t])])
            actions = np.concatenate([traj["actions"][i, :t], np.zeros((1, 6))])
            expected = module.act(traj["observations"][i, : t + 1], actions, rtg, np.arange(t + 1))
            np.testing.assert_allclose(traj["actions"][i, t], np.clip(expected, -1, 1), atol=1e-5)
        assert result["episodes"][i]["return"] == pytest.approx(traj["rewards"][i].sum(), rel=1e-9)


def test_auto_workers_are_two_at_two_threads_on_cpu_only():
    """eval.workers=auto: two env groups where two torch threads can run them, else one."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert resolve_workers("auto", torch.device("cpu")) == 2
        assert resolve_workers("auto", torch.device("meta")) == 1  # not a CPU: unmeasured
        assert resolve_workers(3, torch.device("cpu")) == 3
        torch.set_num_threads(1)
        assert resolve_workers("auto", torch.device("cpu")) == 1
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(DTLabError, match="eval.workers=0 must be auto or an integer of at least 1"):
        resolve_workers(0, torch.device("cpu"))
    # workers are forked processes: a GPU model cannot be shared with them
    with pytest.raises(DTLabError, match="eval.workers=2 forks worker processes, which run on CPU only"):
        resolve_workers(2, torch.device("meta"))


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_workers_step_the_same_episodes(backend):
    """Groups of envs in worker processes: every env's episode as in one lockstep batch (Hopper
    falls, so groups end at other steps), the model's mode and torch's threads as they were."""
    pytest.importorskip("onnxruntime")
    module = tiny_module(HOPPER)
    threads = torch.get_num_threads()
    one, split = (
        rollout(
            Policy.from_module(module),
            HOPPER | {"max_episode_steps": 80},
            [1800.0, 3600.0],
            3,
            seed=5,
            progress=False,
            backend=backend,
            workers=w,
        )
        for w in (1, 4)  # groups of 2, 2, 1 and 1 envs
    )
    assert module.training and torch.get_num_threads() == threads
    assert (one["ran"]["workers"], one["ran"]["threads"], split["ran"]["workers"], split["ran"]["threads"]) == (
        1,
        threads,
        4,
        1,  # each worker at one thread
    )
    assert one["ran"]["backend"] == split["ran"]["backend"] == backend
    assert len({e["length"] for e in one["episodes"]}) > 1  # some fell before the end
    key = [(e["target"], e["seed"], e["length"]) for e in one["episodes"]]
    assert [(e["target"], e["seed"], e["length"]) for e in split["episodes"]] == key
    np.testing.assert_allclose(
        [e["return"] for e in split["episodes"]], [e["return"] for e in one["episodes"]], rtol=1e-6
    )


def test_the_evaluation_record_says_the_backend_workers_and_threads_that_ran(monkeypatch, caplog):
    """protocol() records how the rollout ran, after auto and any fall-back: the record changes
    when the backend does, and onnxruntime's version is among the versions when it ran."""
    pytest.importorskip("onnxruntime")
    import dtlab.inference
    from dtlab.rollout import protocol

    env, targets = HALFCHEETAH | {"max_episode_steps": 5}, [1000.0]
    policy = Policy.from_module(tiny_module(HALFCHEETAH))

    def record(backend: str) -> dict:
        result = rollout(policy, env, targets, 2, progress=False, backend=backend, workers=1)
        return protocol(env, targets, {"values": targets}, 2, 0, "last.ckpt", 10, "reporting", ran=result["ran"])

    eager, ort = record("eager"), record("onnxruntime")
    assert (eager["backend"], eager["workers"], eager["threads"]) == ("eager", 1, torch.get_num_threads())
    assert ort["backend"] == "onnxruntime" and ort["versions"]["onnxruntime"] == onnxruntime_version()
    assert "onnxruntime" not in eager["versions"] and {k: v for k, v in ort.items() if k != "versions"} != eager
    # a backend that cannot run this model falls back to eager, and the record says eager
    monkeypatch.setattr(dtlab.inference, "_onnx_session", lambda core, example: lambda *x: core(*x) + 1e-4)
    fell_back = record("onnxruntime")
    assert fell_back["backend"] == "eager" and "onnxruntime" not in fell_back["versions"]


def onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


class DiesInWorkers(Policy):
    """A policy whose worker processes die at their first action, as one killed by the OOM killer
    would (and whose act raises in the caller's own process)."""

    def act(self, window: dict[str, torch.Tensor]) -> torch.Tensor:
        if os.getpid() != PARENT:
            os.kill(os.getpid(), signal.SIGKILL)
        raise DTLabError("acted in the caller's process")


PARENT = os.getpid()


def test_a_dead_worker_is_one_clear_error():
    """A worker process that dies mid-rollout ends the rollout with one line that says so and
    how to see its error; no worker is left behind."""
    module = tiny_module(HALFCHEETAH)
    policy = DiesInWorkers(module.model, module.state_mean, module.state_std, module.reward_scale)
    with pytest.raises(DTLabError, match=r"a rollout worker process died \(exit code -9\).*eval.workers=1"):
        rollout(policy, HALFCHEETAH, [1000.0], 2, progress=False, workers=2)
    assert multiprocessing.active_children() == []
    with pytest.raises(DTLabError, match="acted in the caller's process"):  # one worker: this process
        rollout(policy, HALFCHEETAH, [1000.0], 2, progress=False, workers=1)


def test_same_seed_same_returns_other_seed_other_returns():
    policy = Policy.from_module(tiny_module(HALFCHEETAH))
    a, b, c = (rollout(policy, HALFCHEETAH, [3000.0], 2, seed=s, progress=False) for s in (7, 7, 8))
    returns = [[e["return"] for e in r["episodes"]] for r in (a, b, c)]
    assert returns[0] == returns[1] != returns[2]
    assert [e["seed"] for e in a["episodes"]] == [7, 8]


def test_early_terminations_stop_counting():
    result = rollout(Policy.from_module(tiny_module(HOPPER)), HOPPER, [1800.0], 6, seed=0, record=True, progress=False)
    traj = result["trajectories"]
    lengths = np.array([e["length"] for e in result["episodes"]])
    assert (lengths < HOPPER["max_episode_steps"]).all()  # an untrained hopper falls
    np.testing.assert_array_equal(traj["alive"].sum(1), lengths)
    for i, e in enumerate(result["episodes"]):
        assert e["return"] == pytest.approx(traj["rewards"][i, : e["length"]].sum())
        assert not traj["alive"][i, e["length"] :].any()


def test_normalized_score_is_d4rls():
    assert normalized_score(-280.178953, HALFCHEETAH) == pytest.approx(0.0)
    assert normalized_score(12135.0, HALFCHEETAH) == pytest.approx(100.0)
    assert normalized_score(5927.41, HALFCHEETAH) == pytest.approx(
        100 * (5927.41 + 280.178953) / (12135.0 + 280.178953)
    )


def test_targets_from_values_and_dataset():
    assert resolve_targets({"values": [6000, 12000]}) == [6000.0, 12000.0]
    assert resolve_targets({"quantiles": [0.5, 1.0], "max_multiples": [1.2]}, [0.0, 10.0, 20.0]) == [10.0, 20.0, 24.0]
    with pytest.raises(DTLabError, match="not a finite number"):
        resolve_targets({"values": ["high"]})
    with pytest.raises(DTLabError, match="no target returns"):
        resolve_targets({"values": []})


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A smoke run's checkpoint, evaluation every 10 steps with video."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from dtlab.cli import CONF_DIR

    out = tmp_path_factory.mktemp("run")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "train", overrides=["debug=smoke", "eval.video=true", "eval.video_frames=10"], return_hydra_config=True
        )
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out)
    HydraConfig().set_config(cfg)
    metrics = train(cfg)
    return out, metrics


def test_callback_logs_eval_metrics_plots_and_video(tiny_checkpoint):
    out, metrics = tiny_checkpoint
    assert {"eval/4074/return_mean", "eval/11476/normalized_score", "eval/normalized_score"} <= set(metrics)
    assert sorted(p.name for p in (out / "eval").glob("*.png")) == [
        "return_conditioning_step10.png",
        "return_conditioning_step20.png",
    ]
    assert (out / "checkpoints" / "best.ckpt").is_file()
    video = out / "eval" / "video_target4074_step20.mp4"
    frames = imageio.mimread(video)
    assert len(frames) == 10 and frames[0].shape == (240, 240, 3)
    assert frames[0].std() > 10  # a rendered scene, not a blank frame


def test_evaluate_command_end_to_end(tiny_checkpoint, tmp_path):
    out, _ = tiny_checkpoint
    cmd = [
        sys.executable,
        "-m",
        "dtlab.evaluate",
        f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}",
        "target_return=custom",
        "target_return.values=[0,500]",
        "eval.episodes=3",
        "eval.seed=5",
        f"hydra.run.dir={tmp_path}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert [e["seed"] for e in report["episodes"]] == [5, 6, 7, 8, 9, 10]
    assert [s["target"] for s in report["summary"]] == [0.0, 500.0] and report["env_id"] == "HalfCheetah-v5"
    assert all(e["length"] == 50 for e in report["episodes"])  # the checkpoint's env config: 50-step episodes
    assert {"gymnasium", "mujoco"} <= set(report["protocol"]["versions"])
    assert (tmp_path / "return_conditioning.png").is_file()
    assert "normalized" in result.stdout


def test_final_evaluation_reports_last_and_best_on_seeds_no_selection_used(tiny_checkpoint, make_cfg):
    out, metrics = tiny_checkpoint
    record = json.loads((out / "final_evaluation.json").read_text())
    final = record["checkpoints"]
    assert set(final) == {"last", "best"}
    # best.ckpt: the first evaluation at the highest in-training score (a later one must beat it)
    scores = [(h["step"], h["eval/normalized_score"]) for h in record["history"] if "eval/normalized_score" in h]
    steps = {"last": 20, "best": max(scores, key=lambda s: s[1])[0]}
    saved = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    (state,) = [s for k, s in saved["callbacks"].items() if k.startswith("EvaluationCallback")]
    selection = state["selection_seeds"]
    assert selection == [0, 3]  # debug=smoke: 2 targets x 2 episodes in training
    # the run's id, written at train time, travels in its checkpoints (a resumed run keeps it)
    run_id = json.loads((out / "final_evaluation.json").read_text())["run_id"]
    assert len(run_id) == 32 and state["run_id"] == run_id
    for name, record in final.items():
        protocol = record["protocol"]
        assert protocol["checkpoint"].endswith(f"{name}.ckpt") and protocol["step"] == steps[name]
        assert protocol["episodes_per_target"] == 2 and protocol["targets"] == [4074.0, 11476.0]
        assert protocol["seeds"] == [10000, 10003] and protocol["seeds_role"] == "reporting"
        assert {"dtlab", "gymnasium", "mujoco"} <= set(protocol["versions"]) and protocol["env_id"] == "HalfCheetah-v5"
        seeds = [e["seed"] for e in record["episodes"]]
        assert len(seeds) == 4 and not set(seeds) & set(range(selection[0], selection[1] + 1))
        for s in record["summary"]:
            assert metrics[f"final/{name}/{s['target']:g}/normalized_score"] == pytest.approx(s["normalized_score"])
    # dtlab.evaluate defaults to the run's final evaluation, as its checkpoint records it: the
    # run's own targets (the sample's, which dataset=sample chose in training), episodes, seeds,
    # backend (smoke's eager), workers and threads; on last.ckpt it repeats final/last exactly
    last = f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}"
    report = evaluate(make_cfg(last, config="evaluate"))
    ran = ("backend", "workers", "threads")
    assert [report["protocol"][k] for k in ran] == [final["last"]["protocol"][k] for k in ran]
    assert report["protocol"]["backend"] == "eager"
    assert report["protocol"]["targets"] == [4074.0, 11476.0]
    assert report["protocol"]["seeds"] == [10000, 10003] and report["protocol"]["seeds_role"] == "reporting"
    assert report["protocol"]["step"] == 20
    assert [e["return"] for e in report["episodes"]] == [e["return"] for e in final["last"]["episodes"]]
    # asked for the selection seeds, it says so in the record
    overlapping = evaluate(make_cfg(f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}", "eval.seed=0", config="evaluate"))
    assert overlapping["protocol"]["seeds_role"] == "overlaps selection"
    # a benchmark's or a recipe study's evaluation: the development seeds, said in the record
    development = evaluate(make_cfg(last, "eval.dev_seed=20000", config="evaluate"))
    assert development["protocol"]["seeds"] == [20000, 20003]
    assert development["protocol"]["seeds_role"] == "development"
    assert {e["seed"] for e in development["episodes"]} == set(range(20000, 20004))
