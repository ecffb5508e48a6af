"""The Online Decision Transformer's online stage (Zheng, Zhang and Grover 2022): the
`OnlineFinetuning` callback, which after the offline pretraining collects episodes with the
policy being trained, and its replay buffer.

The buffer holds whole trajectories. It starts with the highest-return offline episodes and
then works first in, first out by trajectory: a collected trajectory goes in at the young end,
and past `capacity` the oldest leave, the offline ones first, lowest return first.
Trajectories are kept raw, with the rewards they received. Their returns-to-go are computed
from those rewards when windows are drawn (`ReplayBuffer.episodes()` ->
`dtlab.data.WindowSampler`, the one window builder): that is the paper's hindsight
relabelling, since a collected trajectory is trained on with the return it achieved, never
the exploration return it was conditioned on while collected.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch

from dtlab import DTLabError
from dtlab.data import EXPLORATION, Episodes, stream_seed
from dtlab.policy import Policy
from dtlab.protocol import exploration_seeds, resolve_targets
from dtlab.rollout import rollout

log = logging.getLogger(__name__)
# The env steps collected so far, in the trainer's callback_metrics: the evaluation callback
# records it with each evaluation, the learning curve's other axis (dtlab.render)
ONLINE_ENV_STEPS = "online/env_steps"
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


class OnlineFinetuning(L.Callback):
    """Online finetuning, the Online Decision Transformer's (Zheng, Zhang and Grover 2022), as a
    stage of the same fit: after `pretrain_steps` offline training steps come `rounds` rounds,
    each of which

    1. collects `trajectories_per_round` whole episodes with the batched rollout
       (dtlab.rollout), each action sampled from the gaussian policy, conditioned on the
       exploration return: `explore_return_multiple` x the highest in-training target (the
       paper: 2x the evaluation target);
    2. adds them to the replay buffer (ReplayBuffer: first the training split's `buffer_size`
       highest-return episodes, then first in, first out by trajectory), which relabels their
       returns-to-go with the rewards received (hindsight);
    3. leaves the next `updates_per_round` training steps to draw their windows from the
       buffer (TrajectoryDataModule.use_episodes), through the same window builder.

    Round r runs at the end of step `pretrain_steps + r * updates_per_round` (at the start of
    the fit when that is step 0), after that step's evaluation, so every evaluation scores
    weights trained on the env steps it reports. The run trains `pretrain_steps + rounds *
    updates_per_round` steps in all (dtlab.train sets trainer.max_steps). Round r's envs have
    seeds `start + r * n .. start + (r + 1) * n - 1`, n trajectories a round, from `start` =
    `seed` + run seed x rounds x n on (dtlab.protocol.exploration_seeds: each run seed a block of
    its own, apart from the evaluations' ranges; with `per_run_seeds=False`, `start` = `seed`
    for every run seed, as before that existed); its action noise the stream (run seed, step,
    EXPLORATION). `collect=False` collects nothing: the offline-only control, trained on the
    buffer's offline episodes for the same steps.

    At the end of pretraining it saves `checkpoints/pretrained.ckpt` (a checkpoint like any,
    resumable: rounds start from it), which the final evaluation reports beside last and
    best. The buffer itself travels in every checkpoint (4 bytes x (obs + act dims + 1) a
    step: ~2 MB for 100 Hopper trajectories of 450 steps, ~27 MB for 1000), with the env
    steps and rounds done, so a resumed run collects and trains exactly as the uninterrupted
    one. Every logger gets, once a round, `online/env_steps`, `online/round`, the buffer's
    size, online share and return statistics, the round's collected returns and lengths, and
    the policy's entropy and temperature, all under `online/`."""

    def __init__(
        self,
        env: Mapping,
        target_return: Mapping,
        pretrain_steps: int,
        rounds: int,
        updates_per_round: int = 300,
        trajectories_per_round: int = 1,
        buffer_size: int = 1000,
        explore_return_multiple: float = 2.0,
        seed: int = 100_000,
        collect: bool = True,
        per_run_seeds: bool = True,
        checkpoints_dir: str = "checkpoints",
        vector_mode: str = "sync",
    ) -> None:
        self.env, self.target_return = env, target_return
        self.pretrain_steps, self.rounds, self.updates_per_round = pretrain_steps, rounds, updates_per_round
        self.trajectories_per_round, self.buffer_size = trajectories_per_round, buffer_size
        self.explore_return_multiple, self.seed = explore_return_multiple, seed
        self.collect, self.per_run_seeds = collect, per_run_seeds
        self.checkpoints_dir, self.vector_mode = Path(checkpoints_dir), vector_mode
        self.buffer: ReplayBuffer | None = None
        self.rounds_done, self.env_steps = 0, 0
        self.explore_return = float("nan")
        self.explore_start: int | None = None  # round 0's first env seed (setup; a checkpoint's own when resumed)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if pl_module.config.action_head != "gaussian":
            raise DTLabError("online finetuning samples from the gaussian head: set model.action_head=gaussian")
        datamodule = trainer.datamodule
        # replaced by the checkpoint's buffer when resuming (load_state_dict runs after setup)
        self.buffer = ReplayBuffer.from_offline(datamodule.train, self.buffer_size)
        targets = resolve_targets(self.target_return, datamodule.episode_returns)
        self.explore_return = self.explore_return_multiple * max(targets)
        run_seed = pl_module.hparams.seed if self.per_run_seeds else 0
        self.explore_start = exploration_seeds(self.seed, run_seed, self.rounds, self.trajectories_per_round).start

    def state_dict(self) -> dict:
        return {
            "buffer": self.buffer.state_dict() if self.buffer is not None else None,
            "rounds_done": self.rounds_done,
            "env_steps": self.env_steps,
            "explore_start": self.explore_start,
            "pretrained": str(self.checkpoints_dir / "pretrained.ckpt"),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("buffer") is not None:
            self.buffer = ReplayBuffer.from_state_dict(state_dict["buffer"])
        self.rounds_done, self.env_steps = state_dict["rounds_done"], state_dict["env_steps"]
        # A run goes on exploring from the seeds it began with; a checkpoint written before the
        # seeds depended on the run seed began at online.seed whatever the run seed.
        self.explore_start = state_dict.get("explore_start", self.seed)
        # Resumed into a new run dir: bring pretrained.ckpt along, for the final evaluation.
        old, new = Path(state_dict.get("pretrained") or ""), self.checkpoints_dir / "pretrained.ckpt"
        if old.is_file() and old.resolve() != new.resolve() and not new.exists():
            new.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(old, new)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.rounds_done:  # resumed within the online stage: windows from the restored buffer
            trainer.datamodule.use_episodes(self.buffer.episodes())
        trainer.callback_metrics[ONLINE_ENV_STEPS] = torch.tensor(float(self.env_steps))
        self._round_if_due(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if trainer.global_step == self.pretrain_steps and self.pretrain_steps > 0:
            # before round 0, so that a run resumed from it collects round 0 itself
            trainer.save_checkpoint(self.checkpoints_dir / "pretrained.ckpt")
        self._round_if_due(trainer, pl_module)

    def _round_if_due(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        done = trainer.global_step - self.pretrain_steps  # online steps so far
        at_boundary = done >= 0 and done % self.updates_per_round == 0
        if at_boundary and done // self.updates_per_round == self.rounds_done < self.rounds:
            self.online_round(trainer, pl_module)

    def online_round(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Collect, relabel, add; the next steps train on the buffer. Returns what it logged."""
        r, n = self.rounds_done, self.trajectories_per_round
        metrics: dict[str, float] = {}
        if self.collect:
            trajectories = None
            if trainer.is_global_zero:
                result = rollout(
                    Policy.from_module(pl_module),
                    self.env,
                    [self.explore_return],
                    n,
                    seed=self.explore_start + r * n,
                    vector_mode=self.vector_mode,
                    record=True,
                    progress=False,
                    sample_seed=stream_seed(pl_module.hparams.seed, 0, trainer.global_step, EXPLORATION),
                )
                trajectories = rollout_trajectories(result)
            # every rank trains on the same buffer: rank 0's trajectories
            trajectories = trainer.strategy.broadcast(trajectories, src=0)
            self.buffer.add(trajectories)
            self.env_steps += sum(len(t) for t in trajectories)
            metrics |= {
                "collected_return_mean": float(np.mean([t.ret for t in trajectories])),
                "collected_length_mean": float(np.mean([len(t) for t in trajectories])),
            }
        self.rounds_done += 1
        trainer.datamodule.use_episodes(self.buffer.episodes())
        metrics |= {"env_steps": float(self.env_steps), "round": float(self.rounds_done)}
        metrics |= {"explore_return": self.explore_return, **self.buffer.stats()}
        metrics["temperature"] = float(pl_module.log_alpha.exp())
        if "train/entropy" in trainer.callback_metrics:  # the last step's estimate
            metrics["entropy"] = float(trainer.callback_metrics["train/entropy"])
        metrics = {f"online/{k}": v for k, v in metrics.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        collected = (
            f"mean return {metrics['online/collected_return_mean']:.0f}, "
            f"mean length {metrics['online/collected_length_mean']:.0f}"
            if self.collect
            else "nothing (the offline-only control)"
        )
        log.info(
            "online round %d/%d at step %d: %d env steps so far; collected %s; buffer of %d (%d online), "
            "return mean %.0f",
            self.rounds_done,
            self.rounds,
            trainer.global_step,
            self.env_steps,
            collected,
            len(self.buffer),
            metrics["online/buffer_online_trajectories"],
            metrics["online/buffer_return_mean"],
        )
        return metrics
