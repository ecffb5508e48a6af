"""Environments and batched return-conditioned rollouts (no Lightning imports).

The evaluation protocol: every (target return, episode) pair is one env of a single gymnasium
vector env, seeded `seed + i` for env i. All envs step in lockstep, so at step t every env's
context is the same slice [t-K+1, t] of its history, left-padded while t < K-1, and one
batched model call per env step chooses all actions. The context holds exactly what the model
saw in training: normalized states, actions, returns-to-go (target minus the rewards received
so far, times reward_scale) and timesteps. An env whose episode ended (Hopper and Walker2d
fall) stops counting; it keeps stepping only so that shapes stay static.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
from collections.abc import Callable, Mapping, Sequence

import gymnasium as gym
import mujoco
import numpy as np
import torch
from tqdm.auto import tqdm

from dtlab import DTLabError
from dtlab.inference import BackendPolicy, for_rollout, resolve_backend, resolve_workers
from dtlab.policy import Policy, check_timesteps, windows

# the protocol's names (targets, seed ranges, the record) and the normalized score lived here
# before dtlab.protocol and dtlab.stats: code that imports them from here keeps working
from dtlab.protocol import (  # noqa: F401
    DEV_SEED,
    asks_for_targets,
    check_seed_ranges,
    evaluation_record,
    final_seeds,
    format_summary,
    protocol,
    resolve_targets,
    version,
)
from dtlab.stats import normalized_score

_mujoco_warnings: set[str] = set()


def _log_mujoco_warning(message: str) -> None:
    """MuJoCo prints its warnings to stderr once per env built (20 envs, 20 copies of e.g.
    gymnasium's deprecated `settotalmass`) and appends them to MUJOCO_LOG.TXT in the working
    directory; log each distinct one once instead."""
    if message not in _mujoco_warnings:
        _mujoco_warnings.add(message)
        logging.getLogger("mujoco").warning(message)


mujoco.set_mju_user_warning(_log_mujoco_warning)


class NonFiniteRollout(DTLabError):
    """An episode whose actions, observations or rewards turned NaN or Inf: the evaluation stops
    (a NaN must never become a score). The message names the target, env seed and step; the
    callers that know the checkpoint prefix it."""


def _check_finite(what: str, values: np.ndarray, alive: np.ndarray, target: torch.Tensor, seeds: list, t: int) -> None:
    bad = alive & ~np.isfinite(values.reshape(len(alive), -1)).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise NonFiniteRollout(
            f"the episode at target {float(target[i]):g}, env seed {seeds[i]} has a non-finite {what} at step {t} "
            f"({int(bad.sum())} of {len(alive)} envs at this step): evaluation stopped, no score written. "
            + (
                "The weights are finite: check the state normalization (a zero state_std) and the model's inputs"
                if what == "action"
                else "The env turned unstable (MuJoCo): check the actions' scale and the env version"
            )
        )


def check_env(env: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """Fail early if the env id is unknown or its spaces differ from the env config. Returns the
    bounds of its actions, (low, high), each (act_dim,)."""
    try:
        spec = gym.spec(env["id"])
    except gym.error.Error as e:
        raise DTLabError(f"unknown env id {env['id']!r} ({e}); choose env=halfcheetah, hopper or walker2d") from None
    probe = gym.make(spec)
    obs_dim, act_dim = probe.observation_space.shape[0], probe.action_space.shape[0]
    bounds = probe.action_space.low, probe.action_space.high
    probe.close()
    if (obs_dim, act_dim) != (env["obs_dim"], env["act_dim"]):
        raise DTLabError(
            f"{env['id']} has observation size {obs_dim} and action size {act_dim}, but the env config "
            f"says {env['obs_dim']} and {env['act_dim']}: fix env.obs_dim / env.act_dim"
        )
    return bounds


@torch.inference_mode()
def rollout(
    policy: Policy,
    env: Mapping,
    targets: Sequence[float],
    episodes: int,
    seed: int = 0,
    vector_mode: str = "sync",
    video_frames: int = 0,
    record: bool = False,
    progress: bool = True,
    backend: str = "eager",
    workers: int | str = 1,
    sample_seed: int | None = None,
) -> dict:
    """Run `episodes` episodes for each target return, all at once.

    Returns {"episodes": [{target, seed, return, length, normalized_score}, ...],
    "summary": [{target, return_mean, return_std, return_min, return_max, normalized_score,
    length_mean, episodes}, ...]}, plus "frames" (one list of RGB frames per target, from its
    first episode, at most `video_frames` long) when video_frames > 0, and "trajectories"
    (raw observations, actions, rewards, the steps each env was alive and the step it
    terminated at, if it did, as arrays [N, T, ...], and "final_observations" [N, obs_dim],
    where each episode ended) when `record`. `backend`: how the model
    runs (dtlab.inference: eager, jit, onnxruntime, or auto, the fastest exact one here), built
    once for this rollout.
    `workers` > 1 splits the envs into that many groups, each stepped with its own model calls
    in a forked process of its own at one torch thread (Linux), so that the groups' envs, model
    calls and Python run side by side on the cores; every env's episode is its own either way.
    `auto`: dtlab.inference.resolve_workers (2 on a CPU at 2+ torch threads, on Linux).
    Frames and trajectories are taken with one worker.
    "ran" says how it ran (`execution`: the backend after any fall-back, the workers, the
    threads of each model call), for the evaluation's record (`protocol`).
    `sample_seed`: None acts with the policy's action (for the gaussian head its mean: every
    evaluation); a seed samples each action from the gaussian head's distribution instead, the
    noise from one generator seeded with it (exploration for online finetuning; eager, one
    worker: the draws follow one order).
    """
    model = policy.model
    max_steps = int(env["max_episode_steps"])
    fix = f"evaluate at most {policy.max_ep_len} steps"
    check_timesteps(max_steps - 1, policy.timestep_rows, f"env.max_episode_steps={max_steps}", fix)
    targets = [float(t) for t in targets]
    n = len(targets) * episodes
    if vector_mode not in ("sync", "async"):
        raise DTLabError(f"eval.vector_mode={vector_mode!r} is unknown: use sync or async")
    if video_frames and vector_mode != "sync":
        raise DTLabError("eval.video=true needs eval.vector_mode=sync (frames are taken from the sync envs)")
    workers = rollout_workers(
        workers, policy.state_mean.device, n, bool(video_frames or record or sample_seed is not None)
    )
    generator = None if sample_seed is None else torch.Generator().manual_seed(sample_seed)
    threads = torch.get_num_threads()  # restored at the end: workers run at one thread each
    training = model.training  # restored at the end, whatever the backend did
    if workers > 1:
        torch.set_num_threads(1)
    target = torch.tensor(targets, dtype=torch.float64).repeat_interleave(episodes)  # (N,) env i -> target
    seeds = [seed + i for i in range(n)]
    groups = np.array_split(np.arange(n), workers)  # contiguous groups of envs
    model.eval()
    try:
        # one build (at the workers' one thread), inherited by the forked workers; exploration
        # calls the head's distribution, which the backends' graphs do not export
        policy = for_rollout(policy, backend if generator is None else "eager", max(len(g) for g in groups))
        ran = execution(policy, workers)

        # The progress bar is drawn by this process only, from the steps of the first group (its
        # progress stands for all): a forked worker writes nowhere a logger's thread may hold.
        steps_done = multiprocessing.RawValue("l", 0)  # shared memory, which forked workers inherit
        with tqdm(total=max_steps, desc="rollout", unit="step", leave=False, disable=not progress) as bar:

            def show(done: int) -> None:
                bar.update(done - bar.n)

            def count(done: int) -> None:
                steps_done.value = done

            def run(group: np.ndarray) -> dict:
                lo, hi = int(group[0]), int(group[-1]) + 1
                on_step = None if lo else show if workers == 1 else count
                return _episodes(
                    policy,
                    env,
                    target[lo:hi],
                    seeds[lo:hi],
                    vector_mode,
                    video_frames,
                    episodes,
                    record,
                    on_step,
                    generator,
                )

            parts = [run(groups[0])] if workers == 1 else _in_processes(run, groups, lambda: show(steps_done.value))
    finally:
        model.train(training)
        torch.set_num_threads(threads)

    received = np.concatenate([p["received"] for p in parts])
    lengths = np.concatenate([p["lengths"] for p in parts])
    episode_targets = target.numpy()
    scores = normalized_score(received, env)
    result = {
        "episodes": [
            {
                "target": float(episode_targets[i]),
                "seed": seeds[i],
                "return": float(received[i]),
                "length": int(lengths[i]),
                "normalized_score": float(scores[i]),
            }
            for i in range(n)
        ],
        "summary": [
            summarize(tr, received[episode_targets == tr], lengths[episode_targets == tr], env) for tr in targets
        ],
    }
    result["ran"] = ran
    if video_frames:
        result["frames"] = parts[0]["frames"]
    if record:
        result["trajectories"] = parts[0]["trajectories"]
    return result


def rollout_workers(workers: int | str, device: torch.device, n: int, one: bool = False) -> int:
    """The env groups a rollout of `n` envs steps in processes: `workers` resolved
    (dtlab.inference.resolve_workers), at most one per env; one (`one`) for frames, recorded
    trajectories and sampled actions."""
    workers = resolve_workers(workers, device)
    return 1 if one else min(workers, n)


def execution(policy: Policy | BackendPolicy, workers: int) -> dict:
    """How a rollout's model calls ran, as an evaluation record keeps it: the backend built (after
    `auto` and any fall-back to eager), the worker processes, the torch threads of each call
    (one in workers; ONNX Runtime's session takes torch's), and onnxruntime's version when used.
    They decide the episodes (floating-point sums, amplified by MuJoCo), so they are part of
    repeating an evaluation."""
    backend = policy.backend if isinstance(policy, BackendPolicy) else "eager"
    return {
        "backend": backend,
        "workers": workers,
        "threads": torch.get_num_threads(),
        "onnxruntime": version("onnxruntime") if backend == "onnxruntime" else None,
    }


def planned_execution(backend: str, workers: int | str, device: torch.device, n: int) -> dict:
    """What a final evaluation of `n` envs will run with here, before it runs (for the
    checkpoint: dtlab.evaluate repeats it): the backend `auto` resolves to, the workers and the
    process's torch threads. A backend whose build fails falls back to eager the same way in
    both."""
    return {
        "backend": resolve_backend(backend, device),
        "workers": rollout_workers(workers, device, n),
        "threads": torch.get_num_threads(),
    }


def _in_processes(
    run: Callable[[np.ndarray], dict], groups: list[np.ndarray], waiting: Callable[[], None]
) -> list[dict]:
    """run(group) for each group, each in a forked process of its own, side by side: the results
    in order; `waiting()` is called a few times a second until all have arrived. Threads of one
    process measured slower (the step loop's Python holds the GIL: docs/notes.md);
    forked, each process has the policy, built once, without pickling it, and sends back only
    its group's returns and lengths."""
    fork = multiprocessing.get_context("fork")
    children, parts = [], [None] * len(groups)
    try:
        for group in groups:
            receive, send = fork.Pipe(duplex=False)
            child = fork.Process(target=_child, args=(run, group, send), name="dtlab-rollout")
            child.start()
            send.close()  # the child holds the sending end: EOF here if it dies
            children.append((child, receive))
        pending = {receive: i for i, (_, receive) in enumerate(children)}
        while pending:
            for receive in multiprocessing.connection.wait(list(pending), timeout=0.2):
                i = pending.pop(receive)
                try:
                    ok, value = receive.recv()
                except EOFError:
                    children[i][0].join()
                    raise DTLabError(
                        f"a rollout worker process died (exit code {children[i][0].exitcode}) before sending its "
                        "episodes: run with eval.workers=1 to see the error in this process"
                    ) from None
                if not ok:
                    raise value
                parts[i] = value
            waiting()
        return parts
    finally:
        for child, receive in children:
            if child.is_alive():
                child.terminate()
            child.join()
            receive.close()


def _child(run: Callable[[np.ndarray], dict], group: np.ndarray, send: multiprocessing.connection.Connection) -> None:
    torch.set_num_threads(1)  # the workers share the cores
    try:
        send.send((True, run(group)))
    except BaseException as e:  # noqa: BLE001 - the parent raises it
        try:
            send.send((False, e))
        except Exception:  # noqa: BLE001 - an exception that does not pickle
            send.send((False, DTLabError(f"a rollout worker process failed: {e!r}")))
    finally:
        send.close()


@torch.inference_mode()  # again: a worker process's target does not inherit the caller's mode
def _episodes(
    policy: Policy,
    env: Mapping,
    target: torch.Tensor,
    seeds: list[int],
    vector_mode: str,
    video_frames: int,
    episodes: int,
    record: bool,
    on_step: Callable[[int], None] | None = None,
    generator: torch.Generator | None = None,
) -> dict:
    """One group's envs (env i: target[i], seeds[i]) stepped in lockstep to the end, calling
    on_step(steps done) after each step. Returns its "received" rewards and "lengths" (N,),
    "frames" (every `episodes`-th env's first `video_frames`) and "trajectories" when `record`."""
    model, K, n = policy.model, policy.context_length, len(seeds)
    max_steps = int(env["max_episode_steps"])
    render = {"render_mode": "rgb_array", "camera_name": "track", "width": 240, "height": 240} if video_frames else {}
    envs = gym.make_vec(env["id"], num_envs=n, vectorization_mode=vector_mode, max_episode_steps=max_steps, **render)
    device = policy.state_mean.device

    # Each env's history, normalized and scaled as training saw it: env i's step t is flat
    # row i * max_steps + t, the layout of the training data's episodes (dtlab.policy.windows).
    states = torch.zeros(n * max_steps, model.config.state_dim, device=device)
    actions = torch.zeros(n * max_steps, model.config.act_dim, device=device)
    returns_to_go = torch.zeros(n * max_steps, device=device)
    sequence_start = torch.arange(n, device=device) * max_steps  # (N,)

    received = np.zeros(n)  # rewards received so far (raw)
    lengths = np.zeros(n, dtype=np.int64)
    alive = np.ones(n, dtype=bool)
    frame_envs = list(range(0, n, episodes)) if video_frames else []
    frames: list[list[np.ndarray]] = [[] for _ in frame_envs]
    trajectories = {"observations": [], "actions": [], "rewards": [], "alive": [], "terminated": []}
    low, high = envs.single_action_space.low, envs.single_action_space.high
    final_observations = np.zeros((n, model.config.state_dim))  # where each episode ended (record)

    try:
        obs, _ = envs.reset(seed=seeds)
        for t in range(max_steps):
            rows = sequence_start + t  # (N,)
            states[rows] = policy.normalize(obs)
            returns_to_go[rows] = policy.scale(target - torch.from_numpy(received))  # target minus rewards so far
            first = max(t - K + 1, 0)  # the window holds steps first..t, left-padded while t < K-1
            count = torch.full((n,), t - first + 1, device=device)
            window = windows(states, actions, returns_to_go, sequence_start, count.new_full((n,), first), count, K)
            action = policy.act(window) if generator is None else policy.sample(window, generator)  # (N, act_dim)
            actions[rows] = action
            action = action.float().cpu().numpy()
            _check_finite("action", action, alive, target, seeds, t)  # np.clip would pass a NaN on to MuJoCo
            action = np.clip(action, low, high)
            for i, env_id in enumerate(frame_envs):
                if alive[env_id] and len(frames[i]) < video_frames:
                    frames[i].append(envs.envs[env_id].render())
            next_obs, reward, terminated, truncated, _ = envs.step(action)
            _check_finite("observation", next_obs, alive, target, seeds, t + 1)
            _check_finite("reward", np.asarray(reward), alive, target, seeds, t)
            if record:  # terminated: a true end (a fall), not the time limit (what a dataset's dones hold)
                step = (obs, action, reward, alive.copy(), terminated & alive)
                for key, value in zip(trajectories, step, strict=True):
                    trajectories[key].append(value)
            received += np.where(alive, reward, 0.0)
            lengths += alive
            ended = alive & (terminated | truncated)
            final_observations[ended] = next_obs[ended]  # the vector env resets them at the next step
            alive &= ~(terminated | truncated)
            obs = next_obs
            if on_step is not None:
                on_step(t + 1)
            if not alive.any():
                break
    finally:
        envs.close()
    out = {"received": received, "lengths": lengths, "frames": frames}
    if record:
        out["trajectories"] = {k: np.stack(v, axis=1) for k, v in trajectories.items()}
        out["trajectories"]["final_observations"] = final_observations  # (N, obs_dim)
    return out


def summarize(target: float, returns: np.ndarray, lengths: np.ndarray, env: Mapping) -> dict:
    return {
        "target": float(target),
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()),
        "return_min": float(returns.min()),
        "return_max": float(returns.max()),
        "normalized_score": float(normalized_score(returns.mean(), env)),
        "length_mean": float(lengths.mean()),
        "episodes": len(returns),
    }
