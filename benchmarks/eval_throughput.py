"""Evaluation throughput: the tutorial's sequential loop against dtlab's batched rollout.

    python benchmarks/eval_throughput.py --ckpt outputs/train/.../checkpoints/last.ckpt

In one process, the same policy (one set of weights) and the same (targets x episodes):
  (a) sequential: the HF Decision Transformer tutorial's evaluation loop as it is written, on
      `transformers`' DecisionTransformerModel (the weights exported by
      `dtlab.hf.to_transformers`, checked to predict dtlab's actions to 1e-5 first): one env,
      one episode at a time, batch 1, the whole state history normalized and the full K-step
      window re-encoded at every step, autograd left on as in the tutorial;
  (a') the same loop under torch.no_grad(), the most a user of that loop gets without
      restructuring it;
  (a'') (a') calling dtlab's model, to separate the loop's cost from the model's;
  (b) batched: `dtlab.rollout.rollout`, all episodes in one vector env, one model call a step;
  (c) ceiling: (b)'s sequence of batched model calls alone plus its envs stepped alone;
  (d) (b) through each inference backend (eval.backend: eager, jit, onnxruntime) and, at more
      than one thread, with the envs in two worker processes (eval.workers); dtlab's defaults
      (eval.backend=auto, eval.workers=auto) are one of these rows, marked, for the targets given
      and for 8 targets (a target sweep), each the median of 3 repetitions interleaved across
      backends, with the model's and the envs' shares of the rollout's time on its cores
      (workers x wall time; model calls and env steps timed inside the rollout, in whichever
      process makes them), the rest its overhead, and the backend's largest action difference
      from eager on padded and full windows; and the most an exact backend in one process
      could give (`backend_speedup_bound`: eager's rollout with all of
      its model but the GEMMs free, the GEMMs timed by torch.profiler; workers, which also run
      the envs and the loop side by side, are not bound by it).
Prints env-steps/s of each, the speed-ups of (b) over (a), (a') and (a''), and (b)'s overhead
share (wall time that is neither model calls nor env steps, both timed inside the rollout;
`overhead_share_vs_alone` takes them from (c) instead); writes
benchmarks/results/eval_throughput.json, with `default_backend` and `backend_speedup` (the
default row's env steps/s over eager's, medians of 3, same run), `fastest_backend` and
`fastest_speedup` (per batch: the fastest row, what `dtlab.inference.FASTEST` and
`eval.workers` should say for this thread count, and its speed-up over eager). With
--preset-run (a training run's final_evaluation.json, e.g. of experiment=halfcheetah-medium),
also the share of that run's wall time its evaluations take, eager against the defaults: the
in-training and final rollouts it ran, timed again here at their own batch sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import multiprocessing.sharedctypes
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import transformers
from gymnasium.vector import SyncVectorEnv

from dtlab import inference
from dtlab.checkpoint import load_checkpoint
from dtlab.hf import to_transformers, transformers_actions
from dtlab.inference import for_rollout, resolve_backend, resolve_workers
from dtlab.module import DTModule
from dtlab.policy import Policy
from dtlab.rollout import DEV_SEED, rollout

ENV = {"id": "HalfCheetah-v5", "obs_dim": 17, "act_dim": 6, "ref_min_score": -280.178953, "ref_max_score": 12135.0}


# A window in dtlab's convention -> the actions at its steps, (1, K, act_dim)
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def transformers_forward(hf: torch.nn.Module) -> Forward:
    """The tutorial's model call: full forward, (B, K, 1) returns-to-go, integer attention mask."""
    return lambda s, a, r, ts, mask: transformers_actions(hf, s, a, r, ts, mask)


def get_action(forward: Forward, K: int, states, actions, returns_to_go, timesteps) -> torch.Tensor:
    """The tutorial's `get_action`: whole histories in, their last K steps left-padded into one
    window, the action at the last step out."""
    states, actions = states[-K:], actions[-K:]
    returns_to_go, timesteps = returns_to_go[-K:], timesteps[-K:]
    pad = K - len(states)
    mask = torch.cat([torch.zeros(pad), torch.ones(len(states))]).bool()[None]
    s = torch.cat([torch.zeros(pad, states.shape[1]), states]).float()[None]
    a = torch.cat([torch.zeros(pad, actions.shape[1]), actions]).float()[None]
    r = torch.cat([torch.zeros(pad), returns_to_go]).float()[None]
    ts = torch.cat([torch.zeros(pad, dtype=torch.long), timesteps])[None]
    return forward(s, a, r, ts, mask)[0, -1]


@torch.no_grad()
def check_same_policy(hf: torch.nn.Module, model: torch.nn.Module, K: int, seed: int) -> float:
    """Max abs difference between the two models' actions on random windows, one left-padded
    per pad length, at the valid steps; fails unless it is <= 1e-5."""
    g = torch.Generator().manual_seed(seed)
    s, a = torch.randn(K, K, ENV["obs_dim"], generator=g), torch.rand(K, K, ENV["act_dim"], generator=g) * 2 - 1
    r, ts = torch.randn(K, K, generator=g), torch.arange(K).expand(K, K)
    mask = torch.arange(K)[None] >= torch.arange(K)[:, None]  # window i has i padded steps
    diff = (transformers_actions(hf, s, a, r, ts, mask) - model(s, a, r, ts, mask))[mask].abs().max().item()
    if diff > 1e-5:
        raise SystemExit(f"transformers' model and dtlab's differ by {diff:.2e} > 1e-5: not the same policy")
    return diff


def sequential(
    forward: Forward, module: DTModule, targets: list[float], episodes: int, seed: int, max_steps: int, grad: bool
) -> int:
    """The tutorial's evaluation loop: one env, one episode at a time; histories grow by
    concatenation, the whole state history is normalized at every step and `get_action` runs
    the full forward for one action. The tutorial never turns autograd off, so with grad=True
    every step also records a graph, chained across the episode through `actions[-1] = action`;
    grad=False is the same loop under torch.no_grad()."""
    K = module.hparams.context_length
    mean, std, scale = module.state_mean, module.state_std, module.reward_scale
    env = gym.make(ENV["id"], max_episode_steps=max_steps)
    steps = 0
    with torch.set_grad_enabled(grad):
        for target in targets:
            for e in range(episodes):
                obs, _ = env.reset(seed=seed + e)
                states = torch.from_numpy(obs).float()[None]
                actions = torch.zeros(0, ENV["act_dim"])
                rtg = torch.tensor([target * scale])
                timesteps = torch.zeros(1, dtype=torch.long)
                for t in range(max_steps):
                    actions = torch.cat([actions, torch.zeros(1, ENV["act_dim"])])
                    action = get_action(forward, K, (states - mean) / std, actions, rtg, timesteps)
                    actions[-1] = action
                    obs, reward, terminated, truncated, _ = env.step(action.detach().numpy())
                    steps += 1
                    if terminated or truncated:
                        break
                    states = torch.cat([states, torch.from_numpy(obs).float()[None]])
                    rtg = torch.cat([rtg, (rtg[-1] - reward * scale)[None]])
                    timesteps = torch.cat([timesteps, torch.tensor([t + 1])])
    env.close()
    return steps


@torch.inference_mode()
def ceiling(module: DTModule, n: int, max_steps: int, seed: int) -> tuple[float, float]:
    """Seconds for (b)'s model calls alone (same shapes, same count) and its envs stepped alone."""
    model, K = module.model.eval(), module.hparams.context_length
    g = torch.Generator().manual_seed(seed)
    s, a = torch.randn(n, K, ENV["obs_dim"], generator=g), torch.rand(n, K, ENV["act_dim"], generator=g) * 2 - 1
    r, ts = torch.randn(n, K, generator=g), torch.arange(K).expand(n, K)
    start = time.perf_counter()
    for t in range(max_steps):
        mask = (torch.arange(K) >= K - 1 - t).expand(n, K)
        model(s, a, r, ts, mask, last_only=True)
    model_s = time.perf_counter() - start
    envs = gym.make_vec(ENV["id"], num_envs=n, vectorization_mode="sync", max_episode_steps=max_steps)
    envs.reset(seed=seed)
    actions = np.random.default_rng(seed).uniform(-1, 1, size=(max_steps, n, ENV["act_dim"]))
    start = time.perf_counter()
    for t in range(max_steps):
        envs.step(actions[t])
    env_s = time.perf_counter() - start
    envs.close()
    return model_s, env_s


# rows (d) beyond the backends themselves, at more than one torch thread: name -> (backend,
# ONNX Runtime session config, rollout workers). Two workers: two groups of envs, each in a
# forked process with its own one-thread model calls, side by side on the two cores.
VARIANTS = {
    "onnxruntime_nospin": ("onnxruntime", {"session.intra_op.allow_spinning": "0"}, 1),
    "onnxruntime_2workers": ("onnxruntime", {}, 2),
    "eager_2workers": ("eager", {}, 2),
}


def default_row() -> str:
    """The row (d) that dtlab's defaults run at this thread count (eval.backend=auto and
    eval.workers=auto; with workers, auto is resolved at their one thread, as the rollout does)."""
    cpu, threads = torch.device("cpu"), torch.get_num_threads()
    workers = resolve_workers("auto", cpu)
    torch.set_num_threads(1 if workers > 1 else threads)
    backend = resolve_backend("auto", cpu)
    torch.set_num_threads(threads)
    return backend if workers == 1 else f"{backend}_{workers}workers"


@contextlib.contextmanager
def variant(name: str) -> Iterator[tuple[str, int]]:
    """The backend and workers a row (d) runs, with its ONNX Runtime settings in force."""
    backend, config, workers = VARIANTS.get(name, (name, {}, 1))
    inference.ORT_CONFIG.update(config)
    try:
        yield backend, workers
    finally:
        inference.ORT_CONFIG.clear()


def backends(module: DTModule, env: dict, targets: list[float], episodes: int, seed: int) -> dict:
    """(d): each backend's rollout, median of 3 (the repetitions interleaved across backends, so
    that a drift in the machine's speed falls on each alike), its model calls alone, its largest
    action difference from eager over one rollout's worth of windows (padded ones included), and
    `bound`: eager's rollout speed-up if all of its model but the GEMMs were free."""
    policy, n, K = Policy.from_module(module), len(targets) * episodes, module.hparams.context_length
    g = torch.Generator().manual_seed(seed)
    s, a = torch.randn(n, K, ENV["obs_dim"], generator=g), torch.rand(n, K, ENV["act_dim"], generator=g) * 2 - 1
    r, ts = torch.randn(n, K, generator=g), torch.arange(K).expand(n, K)
    names = ("eager", "jit", "onnxruntime", *(VARIANTS if torch.get_num_threads() > 1 else ()))
    built, build_s, seconds, steps = {}, {}, {b: [] for b in names}, 0
    for backend in names:  # the first build: an ONNX export, which later rollouts of the same model reuse
        start = time.perf_counter()
        with variant(backend) as (chosen, workers):
            threads = torch.get_num_threads()
            torch.set_num_threads(1 if workers > 1 else threads)  # as the rollout builds it
            built[backend] = for_rollout(policy, chosen, n)
            torch.set_num_threads(threads)
        build_s[backend] = time.perf_counter() - start
    shares = {b: [] for b in names}  # per repetition: (model, envs) share of the cores' time, in situ
    for _ in range(3):
        for backend in names:
            with variant(backend) as (chosen, workers), timed_in_situ() as spent:
                start = time.perf_counter()
                result = rollout(
                    policy, env, targets, episodes, seed=seed, progress=False, backend=chosen, workers=workers
                )
                wall = time.perf_counter() - start
            seconds[backend].append(wall)
            shares[backend].append([spent[k].value / (workers * wall) for k in ("model", "envs")])
            steps = sum(e["length"] for e in result["episodes"])
    out = {}
    for backend in names:
        diff, model_s = 0.0, 0.0
        with torch.inference_mode():
            for t in range(env["max_episode_steps"]):
                checked = t < K or t % 100 == 0
                if not checked and backend != "eager":  # only eager's call time is used (`bound`)
                    continue
                mask = (torch.arange(K) >= K - 1 - t).expand(n, K)
                window = {"states": s, "actions": a, "returns_to_go": r, "timesteps": ts, "mask": mask}
                start = time.perf_counter()
                action = built[backend].act(window)
                model_s += time.perf_counter() - start
                if checked:
                    eager = module.model(s, a, r, ts, mask if t < K - 1 else None, last_only=True)
                    diff = max(diff, (action - eager).abs().max().item())
        median = float(np.median(seconds[backend]))
        if backend == "eager":
            out["matmul_floor"] = matmul_floor(module.model, s, a, r, ts, env["max_episode_steps"])
            out["bound"] = median / (median - model_s + out["matmul_floor"])
        model_share, env_share = np.median(shares[backend], axis=0)
        out[backend] = {
            "steps_per_s": steps / median,
            "seconds": seconds[backend],
            "build_seconds": build_s[backend],
            "workers": VARIANTS.get(backend, (backend, {}, 1))[2],
            # of the cores' time (workers x wall time), timed in the rollout itself; the rest is
            # the step loop's own work and waiting
            "model_share": float(model_share),
            "env_share": float(env_share),
            "overhead_share": float(1.0 - model_share - env_share),
            "same_policy_max_abs_diff": diff,
        }
    return out


@contextlib.contextmanager
def timed_in_situ() -> Iterator[dict[str, multiprocessing.sharedctypes.Synchronized]]:
    """Seconds spent in model calls (`Policy.act`, `BackendPolicy.act`) and in vector-env steps
    by the rollouts run inside, in whichever process makes them (forked workers add to the same
    shared counters): what each cost there, with the caches and threads as the loop leaves them
    (a two-thread eager model call took ~1.5x as long inside a rollout as in a loop of its own)."""
    spent = {"model": multiprocessing.Value("d", 0.0), "envs": multiprocessing.Value("d", 0.0)}

    def timed(call: Callable, key: str) -> Callable:
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - the call's own
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                with spent[key].get_lock():
                    spent[key].value += time.perf_counter() - start

        return wrapper

    calls = [(Policy, "act", "model"), (inference.BackendPolicy, "act", "model"), (SyncVectorEnv, "step", "envs")]
    originals = [getattr(owner, name) for owner, name, _ in calls]
    for (owner, name, key), call in zip(calls, originals, strict=True):
        setattr(owner, name, timed(call, key))
    try:
        yield spent
    finally:
        for (owner, name, _), call in zip(calls, originals, strict=True):
            setattr(owner, name, call)


@torch.inference_mode()
def matmul_floor(model: torch.nn.Module, s, a, r, ts, steps: int) -> float:  # noqa: ANN001 - the windows
    """Seconds the eager model's matrix products alone take over `steps` last-token calls on
    full windows (torch.profiler's self time of its GEMMs): what any exact backend still
    computes, so `bound`, the rollout's speed-up if everything else in the model were free
    (the same GEMMs at eager's speed), caps what a backend can give."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(10):  # warm-up
        model(s, a, r, ts, None, last_only=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            model(s, a, r, ts, None, last_only=True)
    gemms = ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm")
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in gemms) / 1e6


def evaluation_share(path: Path, module: DTModule, seed: int) -> dict:
    """The share of a preset run's wall time spent in its rollouts, eager (as the run was
    measured) against dtlab's defaults: each kind of rollout it ran (in-training: targets x
    eval.episodes envs; final: targets x final episodes, for last and best) timed once here,
    with 1000-step episodes; the rest of its wall time is taken as it was."""
    record = json.loads(path.read_text())
    config, final = record["config"], next(iter(record["checkpoints"].values()))["protocol"]
    kinds = {  # name -> (targets, episodes per target, how many such rollouts the run did)
        "in_training": (list(config["target_return"]["values"]), config["eval"]["episodes"], len(record["history"])),
        "final": (final["targets"], final["episodes_per_target"], len(record["checkpoints"])),
    }
    env, wall = {**ENV, "max_episode_steps": 1000}, record["wall_time_s"]
    seconds = {}
    for row in dict.fromkeys(("eager", default_row())):
        seconds[row] = 0.0
        for targets, episodes, count in kinds.values():
            start = time.perf_counter()
            with variant(row) as (backend, workers):
                policy = Policy.from_module(module)
                rollout(policy, env, targets, episodes, seed=seed, progress=False, backend=backend, workers=workers)
            seconds[row] += (time.perf_counter() - start) * count
    rest = wall - seconds["eager"]  # training, validation, checkpoints, start-up
    return {
        "run": str(path),
        "wall_time_s": wall,
        "evaluation_s": seconds,
        "share": {backend: s / (rest + s) for backend, s in seconds.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", help="a dtlab checkpoint; default: a fresh paper-size model")
    parser.add_argument("--targets", type=float, nargs="+", default=[6000.0, 12000.0])
    parser.add_argument(
        "--sweep-targets",
        type=float,
        nargs="+",
        default=[0.0, 2000.0, 4000.0, 6000.0, 8000.0, 10000.0, 12000.0, 14000.0],
    )
    parser.add_argument("--episodes", type=int, default=10, help="per target")
    parser.add_argument("--preset-run", type=Path, help="a preset run's final_evaluation.json: its evaluation share")
    parser.add_argument("--max-steps", type=int, default=1000, help="steps per episode")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=DEV_SEED, help="env seeds (the development range)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eval_throughput.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ckpt:
        module = load_checkpoint(args.ckpt)  # dtlab's one checkpoint reader
    else:
        torch.manual_seed(args.seed)
        module = DTModule(ENV["id"], 17, 6, 1000, [0.0] * 17, [1.0] * 17, reward_scale=0.001)
    env = {**ENV, "max_episode_steps": args.max_steps}
    n = len(args.targets) * args.episodes

    module.eval()
    hf = to_transformers(module).eval()
    same_policy_diff = check_same_policy(hf, module.model, module.hparams.context_length, args.seed)

    loops = {  # name -> (the model call, autograd on)
        "sequential": (transformers_forward(hf), True),
        "sequential_no_grad": (transformers_forward(hf), False),
        "sequential_dtlab_no_grad": (module.model, False),
    }
    seq = {}
    for name, (forward, grad) in loops.items():
        start = time.perf_counter()
        steps = sequential(forward, module, args.targets, args.episodes, args.seed, args.max_steps, grad)
        seq[name] = (steps, time.perf_counter() - start)

    with timed_in_situ() as spent:
        start = time.perf_counter()
        policy = Policy.from_module(module)
        result = rollout(policy, env, args.targets, args.episodes, seed=args.seed, progress=False, backend="eager")
        batched_s = time.perf_counter() - start
    batched_steps = sum(e["length"] for e in result["episodes"])

    model_s, env_s = ceiling(module, n, args.max_steps, args.seed)
    # the loop's own share: model calls and env steps timed where they ran. Taking them from (c)
    # instead, run alone, counts the model's slowdown inside the loop as overhead (two-thread
    # eager calls took ~1.5x as long there; 0.1.0's key, kept as overhead_share_vs_alone).
    overhead = 1.0 - (spent["model"].value + spent["envs"].value) / batched_s
    overhead_vs_alone = max(batched_s - model_s - env_s, 0.0) / batched_s

    batched_rate = batched_steps / batched_s
    seq_rates = {name: steps / seconds for name, (steps, seconds) in seq.items()}
    report = {
        **{f"{name}_steps_per_s": rate for name, rate in seq_rates.items()},
        "batched_steps_per_s": batched_rate,
        "speedup": batched_rate / seq_rates["sequential"],
        "speedup_vs_no_grad": batched_rate / seq_rates["sequential_no_grad"],
        "speedup_vs_same_model": batched_rate / seq_rates["sequential_dtlab_no_grad"],
        "overhead_share": overhead,
        "overhead_share_vs_alone": overhead_vs_alone,
        "ceiling_steps_per_s": batched_steps / (model_s + env_s),
        "same_policy_max_abs_diff": same_policy_diff,
        "seconds": {
            **{name: seconds for name, (_, seconds) in seq.items()},
            "batched": batched_s,
            "model_alone": model_s,
            "envs_alone": env_s,
            "model_in_situ": spent["model"].value,
            "envs_in_situ": spent["envs"].value,
        },
        "setup": {
            "ckpt": args.ckpt,
            "targets": args.targets,
            "episodes_per_target": args.episodes,
            "max_steps": args.max_steps,
            "model": {k: module.hparams[k] for k in ("n_layer", "n_head", "n_embd", "context_length")},
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cpu": platform.processor() or platform.machine(),
        },
    }
    per_backend = {
        f"{len(t)}x{args.episodes}": backends(module, env, t, args.episodes, args.seed)
        for t in (args.targets, args.sweep_targets)
    }
    bounds = {config: results.pop("bound") for config, results in per_backend.items()}
    floors = {config: results.pop("matmul_floor") for config, results in per_backend.items()}
    default = default_row()
    first = next(iter(per_backend.values()))
    report |= {
        "backends": per_backend,
        "default_backend": default,
        "backend_speedup": first[default]["steps_per_s"] / first["eager"]["steps_per_s"],
        "backend_speedup_sweep": list(per_backend.values())[1][default]["steps_per_s"]
        / list(per_backend.values())[1]["eager"]["steps_per_s"],
        # the fastest backend of this run, for FASTEST in dtlab.inference at this thread count
        "fastest_backend": {config: max(r, key=lambda b: r[b]["steps_per_s"]) for config, r in per_backend.items()},
        "fastest_speedup": {
            config: max(b["steps_per_s"] for b in r.values()) / r["eager"]["steps_per_s"]
            for config, r in per_backend.items()
        },
        "backend_speedup_bound": bounds,
        "matmul_floor_seconds": floors,
        # the default's time on its workers' cores that is neither model calls nor env steps
        "backend_overhead_share": first[default]["overhead_share"],
    }
    if args.preset_run:
        report["preset_evaluation_share"] = evaluation_share(args.preset_run, module, args.seed)
    rows = [
        ("(a) HF tutorial loop as written", *seq["sequential"]),
        ("(a') same loop, torch.no_grad()", *seq["sequential_no_grad"]),
        ("(a'') same, dtlab's model", *seq["sequential_dtlab_no_grad"]),
        ("(b) dtlab batched rollout", batched_steps, batched_s),
        ("(c) ceiling: model + envs alone", batched_steps, model_s + env_s),
    ]
    print(f"{'method':36} {'env steps':>10} {'seconds':>9} {'steps/s':>9}")
    for name, steps, seconds in rows:
        print(f"{name:36} {steps:>10} {seconds:>9.1f} {steps / seconds:>9.0f}")
    print(
        f"speed-up (b)/(a): {report['speedup']:.1f}x, (b)/(a'): {report['speedup_vs_no_grad']:.1f}x, "
        f"(b)/(a''): {report['speedup_vs_same_model']:.1f}x; (b) overhead share: {overhead:.1%} "
        f"({overhead_vs_alone:.1%} against (c)'s parts run alone); "
        f"(a) and (b) policies agree to {same_policy_diff:.1e}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(
        f"\n{'(d) backend':31} {'targets x episodes':>18} {'steps/s':>9} {'vs eager':>9} "
        f"{'model share':>12} {'env share':>10} {'overhead':>9} {'max diff':>9}"
    )
    for config, results in per_backend.items():
        for backend, b in results.items():
            speedup = b["steps_per_s"] / results["eager"]["steps_per_s"]
            mark = " (default)" if backend == default else ""
            print(
                f"{backend + mark:31} {config:>18} {b['steps_per_s']:>9.0f} {speedup:>8.2f}x "
                f"{b['model_share']:>12.0%} {b['env_share']:>10.0%} {b['overhead_share']:>9.0%} "
                f"{b['same_policy_max_abs_diff']:>9.1e}"
            )
    print(
        f"fastest here ({torch.get_num_threads()} torch threads): "
        + ", ".join(f"{c} {b} {report['fastest_speedup'][c]:.2f}x" for c, b in report["fastest_backend"].items())
    )
    print(
        "bound on an exact backend's speed-up in one process (eager's GEMMs kept, the rest of the model free): "
        + ", ".join(f"{config} {bound:.2f}x" for config, bound in bounds.items())
    )
    print(f"the default's overhead share (of its workers' cores): {report['backend_overhead_share']:.1%}")
    if args.preset_run:
        share = report["preset_evaluation_share"]["share"]
        print("evaluation share of the preset run's wall time: " + ", ".join(f"{b} {v:.1%}" for b, v in share.items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
