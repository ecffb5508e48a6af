"""The Online Decision Transformer's replay buffer (Zheng et al. 2022): whole trajectories, no
Lightning.

It starts with the highest-return offline episodes and then works first in, first out by
trajectory: a collected trajectory goes in at the young end, and past `capacity` the oldest
leave, the offline ones first, lowest return first. Trajectories are kept raw, with the
rewards they received. Their returns-to-go are computed from those rewards when windows are
drawn (`episodes()` -> `dtlab.data.WindowSampler`, the one window builder): that is the
paper's hindsight relabelling, since a collected trajectory is trained on with the return it
achieved, never the exploration return it was conditioned on while collected.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dtlab.data import Episodes

OFFLINE, ONLINE = "offline", "online"


@dataclass
class Trajectory:
    """One whole episode, raw: what the env gave and what was done."""

    observations: np.ndarray  # (T, obs_dim) float32
    actions: np.ndarray  # (T, act_dim) float32, as sent to the env
    rewards: np.ndarray  # (T,) float32, as received
    source: str = ONLINE  # OFFLINE (the dataset) or ONLINE (collected)

    def __len__(self) -> int:
        return len(self.rewards)

    @property
    def ret(self) -> float:
        return float(self.rewards.sum(dtype=np.float64))


def rollout_trajectories(result: dict) -> list[Trajectory]:
    """The episodes of `dtlab.rollout.rollout(..., record=True)`, each cut where it ended."""
    recorded = result["trajectories"]
    lengths = recorded["alive"].sum(axis=1)  # (N,): steps env i was alive
    return [
        Trajectory(
            recorded["observations"][i, :n].astype(np.float32),
            recorded["actions"][i, :n].astype(np.float32),
            recorded["rewards"][i, :n].astype(np.float32),
        )
        for i, n in enumerate(lengths)
    ]


class ReplayBuffer:
    """At most `capacity` whole trajectories, in the order they came in (oldest first)."""

    def __init__(self, capacity: int, trajectories: Iterable[Trajectory] = ()) -> None:
        if capacity < 1:
            raise ValueError(f"a replay buffer holds at least one trajectory, not capacity={capacity}")
        self.capacity = capacity
        self.trajectories: list[Trajectory] = []
        self.add(trajectories)

    @classmethod
    def from_offline(cls, episodes: Episodes, capacity: int) -> ReplayBuffer:
        """Filled with the `capacity` highest-return episodes (all of them if fewer), lowest
        return first: the worst of them is the oldest, the first to leave (as in the ODT
        reference code, whose buffer is sorted so)."""
        ids = np.argsort(episodes.returns, kind="stable")[-capacity:]  # ascending return
        ends = episodes.starts + episodes.lengths
        return cls(
            capacity,
            (
                Trajectory(
                    episodes.observations[episodes.starts[e] : ends[e]],
                    episodes.actions[episodes.starts[e] : ends[e]],
                    episodes.rewards[episodes.starts[e] : ends[e]],
                    OFFLINE,
                )
                for e in ids
            ),
        )

    def __len__(self) -> int:
        return len(self.trajectories)

    def add(self, trajectories: Iterable[Trajectory]) -> None:
        """Append at the young end; past capacity, the oldest trajectories leave."""
        self.trajectories.extend(trajectories)
        del self.trajectories[: max(len(self.trajectories) - self.capacity, 0)]

    @property
    def returns(self) -> np.ndarray:
        return np.array([t.ret for t in self.trajectories])

    def episodes(self) -> Episodes:
        """The buffer as flat Episodes (oldest first), for `dtlab.data.WindowSampler`: every
        trajectory drawn with probability proportional to its length, as the paper's buffer."""
        lengths = np.array([len(t) for t in self.trajectories], dtype=np.int64)
        return Episodes(
            np.concatenate([t.observations for t in self.trajectories]),
            np.concatenate([t.actions for t in self.trajectories]),
            np.concatenate([t.rewards for t in self.trajectories]),
            (np.cumsum(lengths) - lengths).astype(np.int64),
            lengths,
            np.ones(len(lengths)),
            np.array([t.source for t in self.trajectories]),
        )

    def stats(self) -> dict[str, float]:
        """What the loggers get of it: size, online share, return statistics."""
        returns = self.returns
        online = np.array([t.source == ONLINE for t in self.trajectories])
        return {
            "buffer_trajectories": float(len(returns)),
            "buffer_online_trajectories": float(online.sum()),
            "buffer_return_mean": float(returns.mean()),
            "buffer_return_min": float(returns.min()),
            "buffer_return_max": float(returns.max()),
        }

    def state_dict(self) -> dict:
        """The whole buffer, as tensors (a checkpoint loads them without unpickling code)."""
        episodes = self.episodes()
        return {
            "capacity": self.capacity,
            "lengths": torch.from_numpy(episodes.lengths),
            "online": torch.from_numpy(episodes.sources == ONLINE),
            "observations": torch.from_numpy(episodes.observations),
            "actions": torch.from_numpy(episodes.actions),
            "rewards": torch.from_numpy(episodes.rewards),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> ReplayBuffer:
        bounds = np.cumsum([0, *state["lengths"].tolist()])
        columns: Sequence[np.ndarray] = [state[k].numpy() for k in ("observations", "actions", "rewards")]
        return cls(
            int(state["capacity"]),
            (
                Trajectory(*(c[a:b] for c in columns), ONLINE if online else OFFLINE)
                for a, b, online in zip(bounds[:-1], bounds[1:], state["online"].tolist(), strict=True)
            ),
        )
