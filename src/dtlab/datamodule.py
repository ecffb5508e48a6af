"""The LightningDataModule: training windows and validation batches from checked episodes.

Apart from `dtlab.data`, which loads and checks the data without Lightning: importing
Lightning takes seconds, and bad data must fail before that.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from dtlab.data import (
    BATCHES,
    Episodes,
    WindowSampler,
    check_context_length,
    dataset_report,
    stream_seed,
    top_episodes,
)

VAL_STREAM = 2**31 - 1  # the "rank" whose batch stream is the validation set


class _Steps(IterableDataset):
    """An endless stream of training step numbers from `start_step` on; each becomes its batch
    in `TrajectoryDataModule.on_before_batch_transfer`, at the step itself. Drawn any earlier
    (a loader that prefetches), a batch could miss the trajectories an online round adds to
    the data at the end of the step before (dtlab.callbacks.OnlineFinetuning)."""

    def __init__(self, start_step: int, total_steps: int) -> None:
        self.start_step, self.total_steps = start_step, total_steps

    def __len__(self) -> int:
        return self.total_steps  # for the progress bar; iteration stops at trainer.max_steps

    def __iter__(self) -> Iterator[int]:
        step = self.start_step
        while True:
            yield step
            step += 1


class TrajectoryDataModule(L.LightningDataModule):
    """Serves training windows and a held-out validation set of whole episodes.

    After `setup()`: `state_mean`, `state_std`, `train` and `val` (Episodes), `trained_on`
    (the training episodes windows are drawn from: `train`, or its top fraction, until
    `use_episodes` replaces them), `episode_returns` (all episodes) and `report` are available."""

    def __init__(
        self,
        episodes: Episodes,
        max_ep_len: int,
        context_length: int = 20,
        batch_size: int = 64,
        reward_scale: float = 0.001,
        val_fraction: float = 0.1,
        val_batches: int = 8,
        seed: int = 0,
        ref_scores: Sequence[float] | None = None,
        top_fraction: float = 1.0,
        start_share: float = 0.0,
        start_steps: int = 100,
    ) -> None:
        """episodes: loaded and checked by `dtlab.data.load_episodes`. max_ep_len: rows of the
        model's timestep table (env.max_ep_len). ref_scores: the env's (random, expert)
        reference returns, for the dataset report's normalized mean. top_fraction: train on
        the highest-return episodes holding this share of the transitions (%BC, any algorithm;
        1.0: all); state statistics and validation still come from the whole training split,
        as in the reference code. start_share, start_steps: that share of the windows starts in
        the episodes' first start_steps steps (WindowSampler; 0: the paper's uniform draw)."""
        super().__init__()
        check_context_length(context_length, max_ep_len)
        self.episodes, self.max_ep_len = episodes, max_ep_len
        self.context_length, self.batch_size = context_length, batch_size
        self.reward_scale, self.val_fraction, self.val_batches = reward_scale, val_fraction, val_batches
        self.seed, self.ref_scores, self.top_fraction = seed, ref_scores, top_fraction
        self.start_share, self.start_steps = start_share, start_steps
        self.train: Episodes | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        episodes = self.episodes
        self.episode_returns = episodes.returns
        order = np.random.default_rng(self.seed).permutation(episodes.num_episodes)
        E = episodes.num_episodes
        n_val = min(max(round(self.val_fraction * E), 1), E - 1) if self.val_fraction > 0 and E > 1 else 0
        train_ids = np.sort(order[n_val:])
        self.val, self.train = episodes.select(np.sort(order[:n_val])), episodes.select(train_ids)
        self.state_mean = self.train.observations.mean(axis=0)
        # +1e-6 as in the DT reference code: constant dimensions must not divide by zero
        self.state_std = self.train.observations.std(axis=0) + 1e-6
        kept = top_episodes(self.train, self.top_fraction)  # ids within the training split
        self.trained_on = self.train.select(kept)
        name = f"top {self.top_fraction:g} of train" if self.top_fraction < 1 else None
        self.report = dataset_report(episodes, self.ref_scores, train_ids[kept] if name else None, name or "")
        self.train_sampler = self._sampler(self.trained_on)

    def _sampler(self, episodes: Episodes) -> WindowSampler:
        return WindowSampler(
            episodes,
            self.context_length,
            self.reward_scale,
            self.state_mean,
            self.state_std,
            self.max_ep_len,
            self.start_share,
            self.start_steps,
        )

    def use_episodes(self, episodes: Episodes) -> None:
        """Draw the training windows of every later step from `episodes` (an online round's
        replay buffer), normalized with the training split's state statistics as before."""
        self.train_sampler = self._sampler(episodes)

    def batch_at(self, step: int, rank: int = 0) -> dict[str, torch.Tensor]:
        """The training batch of step `step` on process `rank`: a function of (seed, rank, step)
        and the episodes drawn from, so that a resumed run draws what the uninterrupted one did."""
        generator = torch.Generator().manual_seed(stream_seed(self.seed, rank, step, BATCHES))
        return self.train_sampler.sample(self.batch_size, generator)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        steps = _Steps(
            start_step=trainer.global_step if trainer else 0,
            total_steps=max(trainer.max_steps, 1) if trainer else 1,
        )
        return DataLoader(steps, batch_size=None)

    def on_before_batch_transfer(self, batch: object, dataloader_idx: int) -> object:
        """A training step number becomes its batch here, when Lightning runs that step."""
        if isinstance(batch, int):
            return self.batch_at(batch, self.trainer.global_rank if self.trainer else 0)
        return batch  # a validation batch

    def val_dataloader(self) -> DataLoader:
        """The same fixed windows of the held-out episodes at every validation."""
        batches = []
        if self.val.num_episodes:
            sampler = self._sampler(self.val)
            generator = torch.Generator().manual_seed(stream_seed(self.seed, VAL_STREAM, 0, BATCHES))
            batches = [sampler.sample(self.batch_size, generator) for _ in range(self.val_batches)]
        return DataLoader(batches, batch_size=None)
