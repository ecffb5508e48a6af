"""dtlab-collect: roll behaviour policies out into an offline dataset, in the schema of the hub's
`edbeeching/decision_transformer_gym_replay` (one row an episode: observations, actions,
rewards, dones), D4RL's way of making its MuJoCo sets.

    python -m dtlab.collect policy=PATH env=hopper episodes=100 out=data/hopper-mine.parquet
    python -m dtlab.collect recipe=hopper-mixed agents_dir=rl-trained-agents out=data/hopper-mixed-v5.parquet

A behaviour is a policy (a dtlab checkpoint `.ckpt`, an exported ONNX policy `.onnx`, a
Stable-Baselines3 / RL Zoo agent `.zip` with the `[collect]` extra, or `random`), Gaussian
action noise of std `noise` and a probability `epsilon` of a uniform random action, both
clipped to the action space; `behaviours` lists several with their `share` of the episodes (a
mixture, conf/recipe/*.yaml). Each behaviour's episodes run at once in vector envs through the
evaluation's rollout (dtlab.rollout), env seeds `seed` on, one after another. `dones` holds true
terminations only (a fall), never the time limit. Beside the file goes `datasets.json`: each
dataset's behaviour, seed and return statistics (`../shared/data/datasets.json`'s form);
with `minari=true` (the `minari` extra) also a local Minari dataset `dtlab/<name>-v0`. Load it
back with `dataset=local dataset.path=FILE` (or `dataset=minari dataset.name=dtlab/<name>-v0`).
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import time
from collections.abc import Mapping
from pathlib import Path

import gymnasium as gym
import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dtlab import DTLabError
from dtlab.cli import CONF_DIR, find_checkpoint, run_cli
from dtlab.data import episodes_to_dataset
from dtlab.model import DTConfig
from dtlab.policy import Policy
from dtlab.protocol import version
from dtlab.rollout import check_env, rollout

log = logging.getLogger(__name__)

SB3_ALGOS = {"a2c", "ppo", "sac", "td3", "ddpg", "dqn"}  # stable_baselines3's; the rest are sb3_contrib's
CONTRIB_ALGOS = {"tqc", "trpo", "ars", "crossq", "qrdqn"}


class MarkovPolicy(nn.Module):
    """A policy that reads the last observation only, called as the rollout calls a DT: a
    window of K=1 raw observations (its Policy normalizes with mean 0, std 1) in, one action
    per env out. Subclasses give `actions(obs)`, obs (B, obs_dim) float32 numpy."""

    def __init__(self, state_dim: int, act_dim: int, max_ep_len: int) -> None:
        super().__init__()
        self.config = DTConfig(state_dim=state_dim, act_dim=act_dim, max_ep_len=max_ep_len, context_length=1)

    def forward(self, states: torch.Tensor, *window: torch.Tensor | None, last_only: bool = True) -> torch.Tensor:
        obs = states[:, -1].cpu().numpy()  # (B, obs_dim)
        return torch.as_tensor(self.actions(obs), dtype=torch.float32)  # (B, act_dim)

    def actions(self, obs: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class RandomPolicy(MarkovPolicy):
    """Uniform actions in [-1, 1] (D4RL's random sets), from a generator of its own."""

    def __init__(self, state_dim: int, act_dim: int, max_ep_len: int, seed: int) -> None:
        super().__init__(state_dim, act_dim, max_ep_len)
        self.rng = np.random.default_rng(seed)

    def actions(self, obs: np.ndarray) -> np.ndarray:
        return self.rng.uniform(-1.0, 1.0, size=(len(obs), self.config.act_dim))


class SB3Policy(MarkovPolicy):
    """A Stable-Baselines3 agent file (`algo` as RL Zoo names it: tqc, sac, ppo, ...), with the
    VecNormalize observation statistics the RL Zoo keeps beside it (`<env>/vecnormalize.pkl`)
    applied as in training. deterministic=False samples from the agent's own policy (torch's
    generator, seeded by the caller), as the RL Zoo's stochastic enjoy does."""

    def __init__(self, path: Path, algo: str, deterministic: bool, state_dim: int, act_dim: int, max_ep_len: int):
        super().__init__(state_dim, act_dim, max_ep_len)
        try:
            if algo in SB3_ALGOS:
                import stable_baselines3 as lib
            else:
                import sb3_contrib as lib
        except ImportError:
            raise DTLabError(f"{path} is a Stable-Baselines3 agent: pip install 'dtlab[collect]'") from None
        # the RL Zoo's enjoy.py: schedules pickled by older versions are not needed to act
        custom = {"learning_rate": 0.0, "lr_schedule": lambda _: 0.0, "clip_range": lambda _: 0.0}
        # the RL Zoo's files pickle their spaces with the old `gym`: the env's own stand in
        custom["observation_space"] = gym.spaces.Box(-np.inf, np.inf, (state_dim,), np.float64)
        custom["action_space"] = gym.spaces.Box(-1.0, 1.0, (act_dim,), np.float32)
        self.agent = getattr(lib, algo.upper() if algo != "crossq" else "CrossQ").load(
            str(path), device="cpu", custom_objects=custom
        )
        self.deterministic = deterministic
        self.obs_rms = None
        stats = path.parent / path.stem / "vecnormalize.pkl"
        if stats.is_file():
            with stats.open("rb") as f:
                norm = pickle.load(f)  # noqa: S301 - the agent's own statistics, beside it
            if norm.norm_obs:
                self.obs_rms, self.clip_obs, self.eps = norm.obs_rms, norm.clip_obs, norm.epsilon
        space = self.agent.observation_space.shape
        if space != (state_dim,):
            raise DTLabError(f"{path} takes observations of shape {space}, the env gives ({state_dim},)")

    def actions(self, obs: np.ndarray) -> np.ndarray:
        if self.obs_rms is not None:
            obs = np.clip(
                (obs - self.obs_rms.mean) / np.sqrt(self.obs_rms.var + self.eps), -self.clip_obs, self.clip_obs
            )
        action, _ = self.agent.predict(obs.astype(np.float32), deterministic=self.deterministic)
        return action


class OnnxPolicy(nn.Module):
    """A policy exported by dtlab.export (format=onnx), run by ONNX Runtime on the rollout's
    windows: its Policy passes raw observations and returns (mean 0, std 1, scale 1), since
    the file has its normalization baked in."""

    def __init__(self, path: Path, max_ep_len: int) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise DTLabError(f"{path} is an ONNX policy: pip install 'dtlab[onnx]'") from None
        meta_path = path.with_name(path.name + ".json")
        if not meta_path.is_file():
            raise DTLabError(f"{meta_path} (the export's metadata, written beside it by dtlab.export) is missing")
        self.meta = json.loads(meta_path.read_text())
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        K, S, A = self.meta["context_length"], self.meta["obs_dim"], self.meta["act_dim"]
        self.config = DTConfig(state_dim=S, act_dim=A, max_ep_len=max_ep_len, context_length=K)

    def forward(self, states, actions, returns_to_go, timesteps, mask=None, last_only: bool = True):  # noqa: ANN001, ANN201
        if mask is None:
            mask = torch.ones(states.shape[:2], dtype=torch.bool)
        feed = {"observations": states, "actions": actions, "returns_to_go": returns_to_go}
        feed |= {"timesteps": timesteps, "mask": mask}
        out = self.session.run(None, {k: feed[k].cpu().numpy() for k in self.inputs})[0]
        return torch.from_numpy(out)


class Behaviour(nn.Module):
    """A policy acting with D4RL-style exploration: Gaussian noise of std `noise` on its action,
    and with probability `epsilon` a uniform random action instead, both from one generator of
    its own; clipped to [-1, 1] (the MuJoCo tasks' action space)."""

    def __init__(self, policy: nn.Module, noise: float, epsilon: float, seed: int) -> None:
        super().__init__()
        self.policy, self.noise, self.epsilon = policy, noise, epsilon
        self.config = policy.config
        self.rng = np.random.default_rng(seed)

    def forward(self, *window: torch.Tensor | None, last_only: bool = True) -> torch.Tensor:
        action = self.policy(*window, last_only=True).float().cpu().numpy()  # (B, act_dim)
        if self.noise > 0:
            action = action + self.rng.normal(0.0, self.noise, size=action.shape)
        if self.epsilon > 0:
            explore = self.rng.random(len(action)) < self.epsilon
            action[explore] = self.rng.uniform(-1.0, 1.0, size=(int(explore.sum()), action.shape[1]))
        return torch.as_tensor(np.clip(action, -1.0, 1.0), dtype=torch.float32)


def load_behaviour(spec: Mapping, env: Mapping, seed: int) -> Policy:
    """The rollout's Policy for one behaviour of the config (path, algo, deterministic, noise,
    epsilon), its random draws seeded by `seed`."""
    S, A, T = int(env["obs_dim"]), int(env["act_dim"]), int(env["max_episode_steps"])
    path = str(spec["path"])
    raw = (torch.zeros(S), torch.ones(S), 1.0)  # observations and returns as the env gives them
    if path == "random":
        policy = Policy(RandomPolicy(S, A, T, seed), *raw)
    elif path.endswith(".zip"):
        file = Path(path)
        if not file.is_file():
            raise DTLabError(
                f"{path} does not exist: give a Stable-Baselines3 agent file (agents_dir=... for a recipe)"
            )
        algo = sb3_algo(spec)
        torch.manual_seed(seed)  # what a stochastic SB3 policy samples with
        policy = Policy(SB3Policy(file, algo, bool(spec.get("deterministic", False)), S, A, T), *raw)
    elif path.endswith(".onnx"):
        policy = Policy(OnnxPolicy(Path(path), T), *raw)
    elif path.endswith(".ckpt"):
        find_checkpoint(path)  # a wrong path fails before Lightning is imported
        from dtlab.checkpoint import load_checkpoint

        policy = Policy.from_module(load_checkpoint(path))
    else:
        raise DTLabError(f"policy {path!r}: give a .ckpt (dtlab), .onnx (dtlab.export), .zip (SB3) or random")
    if (policy.model.config.state_dim, policy.model.config.act_dim) != (S, A):
        raise DTLabError(f"{path} acts in another env than {env['id']}: its dims differ")
    behaviour = Behaviour(policy.model, float(spec.get("noise", 0.0)), float(spec.get("epsilon", 0.0)), seed)
    return Policy(behaviour, policy.state_mean, policy.state_std, policy.reward_scale)


def sb3_algo(spec: Mapping) -> str:
    """An SB3 agent file's algorithm: `algo`, else the RL Zoo's folder (<algo>/<Env>_1/<Env>.zip),
    else the file name's first word (ppo-hopper.zip)."""
    path = Path(str(spec["path"]))
    for name in (spec.get("algo"), path.parent.parent.name, re.split(r"[-_.]", path.stem)[0]):
        if name and name.lower() in SB3_ALGOS | CONTRIB_ALGOS:
            return name.lower()
    raise DTLabError(f"{path}: say which algorithm made it, algo=tqc|sac|ppo|... ({sorted(SB3_ALGOS | CONTRIB_ALGOS)})")


def episode_counts(shares: list[float], episodes: int) -> list[int]:
    """`episodes` split by `shares` (largest remainder): whole numbers that add up."""
    share = np.asarray(shares, dtype=np.float64)
    if len(share) == 0 or (share < 0).any() or share.sum() <= 0:
        raise DTLabError(f"behaviours' shares {shares} must be >= 0 with a positive sum")
    exact = share / share.sum() * episodes
    counts = np.floor(exact).astype(int)
    counts[np.argsort(-(exact - counts), kind="stable")[: episodes - counts.sum()]] += 1
    return counts.tolist()


def collect(cfg: DictConfig) -> Path:
    """Roll out cfg's behaviours and write the dataset; returns its path."""
    if cfg.get("unavailable"):
        raise DTLabError(f"recipe {cfg.name}: {cfg.unavailable}")
    unresolved = OmegaConf.to_container(cfg.behaviours, resolve=False) if cfg.behaviours else []
    if cfg.agents_dir is None and any("${agents_dir}" in str(b.get("path")) for b in unresolved):
        raise DTLabError(
            f"recipe {cfg.name} rolls out the RL Zoo's agents: give agents_dir=PATH, a checkout of its trained agents "
            "(the rl-trained-agents repository, with its <algo>/<Env>-v3_1/ folders)"
        )
    if cfg.out is None:
        raise DTLabError("give out=PATH.parquet: where to write the dataset")
    behaviours = [OmegaConf.to_container(b, resolve=True) for b in cfg.behaviours] if cfg.behaviours else []
    if cfg.policy is not None:
        if behaviours:
            raise DTLabError("give policy=PATH or behaviours=[...] (a recipe), not both")
        behaviours = [
            {
                "path": cfg.policy,
                "algo": cfg.algo,
                "deterministic": cfg.deterministic,
                "noise": cfg.noise,
                "epsilon": cfg.epsilon,
                "share": 1.0,
            }
        ]
    if not behaviours:
        raise DTLabError("give policy=PATH (a .ckpt, .onnx, SB3 .zip or random) or recipe=NAME")
    env = OmegaConf.to_container(cfg.env, resolve=True)
    check_env(env)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    counts = episode_counts([float(b.get("share", 1.0)) for b in behaviours], int(cfg.episodes))
    started = time.monotonic()
    parts, seed = [], int(cfg.seed)
    for spec, n in zip(behaviours, counts, strict=True):
        if n == 0:
            continue
        policy = load_behaviour(spec, env, seed)
        target = float(spec.get("target_return") or max(env["target_returns"]))  # a DT's; ignored by the others
        log.info("%s: %d episodes, env seeds %d-%d", spec["path"], n, seed, seed + n - 1)
        result = rollout(
            policy, env, [target], n, seed=seed, record=True, backend="eager", workers=1, vector_mode=cfg.vector_mode
        )
        parts.append(result)
        seed += n
    # each episode as the rollout scored it: its length and return, and its steps cut there
    episodes = [e for p in parts for e in p["episodes"]]
    lengths = np.array([e["length"] for e in episodes])
    returns = np.array([e["return"] for e in episodes])
    recorded = [(p["trajectories"], i, e["length"]) for p in parts for i, e in enumerate(p["episodes"])]
    flat = {
        k: np.concatenate([t[k][i, :n] for t, i, n in recorded])
        for k in ("observations", "actions", "rewards", "terminated")
    }
    finals = np.concatenate([p["trajectories"]["final_observations"] for p in parts])  # (episodes, obs_dim)
    dataset = episodes_to_dataset(flat["observations"], flat["actions"], flat["rewards"], flat["terminated"], lengths)
    dataset.to_parquet(str(out))
    stats = {
        "env_id": env["id"],
        "episodes": len(lengths),
        "transitions": int(lengths.sum()),
        "behavior": "+".join(behaviour_label(b) for b, n in zip(behaviours, counts, strict=True) if n),
        "seed": int(cfg.seed),
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()),
        "return_min": float(returns.min()),
        "return_max": float(returns.max()),
        "length_mean": float(lengths.mean()),
        "terminations": int(flat["terminated"].sum()),
        "seconds": round(time.monotonic() - started, 1),
        "versions": {p: version(p) for p in ("dtlab", "gymnasium", "mujoco", "stable-baselines3")},
    }
    index = out.parent / "datasets.json"
    table = json.loads(index.read_text()) if index.is_file() else {}
    table[cfg.name or out.stem] = stats
    index.write_text(json.dumps(table, indent=2))
    if cfg.minari:
        write_minari(flat, lengths, finals, env, cfg.name or out.stem, int(cfg.seed))
    print(
        f"wrote {out}: {stats['episodes']} episodes, {stats['transitions']} steps, return "
        f"{stats['return_mean']:.0f} +- {stats['return_std']:.0f} ({stats['return_min']:.0f} .. "
        f"{stats['return_max']:.0f}); statistics in {index}"
    )
    return out


def behaviour_label(spec: Mapping) -> str:
    """`policy@noise`, the shared datasets' notation (random@0, tqc@0.05, ...): an SB3 agent by
    its algorithm, a dtlab checkpoint or ONNX file by its file name."""
    path = str(spec["path"])
    if path == "random":
        name = "random"
    elif path.endswith(".zip"):
        name = sb3_algo(spec)
    else:
        name = Path(path).name
    label = f"{name}@{spec.get('noise', 0.0):g}"
    return label + (f"+eps{spec['epsilon']:g}" if spec.get("epsilon") else "")


def write_minari(flat: dict, lengths: np.ndarray, finals: np.ndarray, env: Mapping, name: str, seed: int) -> str:
    """The same episodes as a local Minari dataset `dtlab/<name>-v0` (the minari extra), with the
    env's D4RL reference scores; returns its id. Minari holds T + 1 observations an episode:
    the T acted from, and the one it ended in."""
    try:
        import minari
        from minari.data_collector import EpisodeBuffer
    except ImportError:
        raise DTLabError("minari=true needs the minari extra: pip install 'dtlab[minari]'") from None
    buffers, start = [], 0
    for i, n in enumerate(lengths):
        end = start + int(n)
        last = np.zeros(int(n), dtype=bool)
        last[-1] = True
        terminal = bool(flat["terminated"][end - 1])
        buffers.append(
            EpisodeBuffer(
                id=i,
                seed=seed + i,
                observations=np.concatenate([flat["observations"][start:end], finals[i][None]]),
                actions=flat["actions"][start:end],
                rewards=flat["rewards"][start:end],
                terminations=last & terminal,
                truncations=last & (not terminal),
                infos={},
            )
        )
        start = end
    dataset_id = f"dtlab/{name}-v0"
    if dataset_id in minari.list_local_datasets():
        minari.delete_dataset(dataset_id)
    minari.create_dataset_from_buffers(
        dataset_id,
        buffers,
        env=gym.make(env["id"], max_episode_steps=int(env["max_episode_steps"])),
        algorithm_name="dtlab-collect",
        ref_min_score=env.get("ref_min_score"),
        ref_max_score=env.get("ref_max_score"),
    )
    log.info("wrote the Minari dataset %s", dataset_id)
    return dataset_id


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="collect")
def main(cfg: DictConfig) -> None:
    run_cli(collect, cfg)


if __name__ == "__main__":
    main()
