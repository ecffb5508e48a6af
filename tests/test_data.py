import numpy as np
import pytest
import torch
from conftest import drawn_episodes
from datasets import Dataset

from dtlab import DTLabError
from dtlab.data import (
    SAMPLE_PATH,
    WindowSampler,
    episodes_from_dataset,
    load_episodes,
    load_local,
    load_sample,
    top_episodes,
)
from dtlab.datamodule import TrajectoryDataModule

OBS, ACT = 3, 2


def make_dataset(lengths, seed=0, obs=OBS, act=ACT) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset.from_dict(
        {
            "observations": [rng.normal(size=(n, obs)).astype(np.float32) for n in lengths],
            "actions": [rng.uniform(-1, 1, size=(n, act)).astype(np.float32) for n in lengths],
            "rewards": [rng.normal(size=n).astype(np.float32) for n in lengths],
            "dones": [[False] * n for n in lengths],
        }
    )


def test_returns_to_go_are_reversed_cumulative_sums_per_episode():
    episodes = episodes_from_dataset(make_dataset([4, 1, 6]))
    rtg = episodes.returns_to_go()
    for s, n in zip(episodes.starts, episodes.lengths, strict=True):
        r = episodes.rewards[s : s + n].astype(np.float64)
        np.testing.assert_allclose(rtg[s : s + n], np.cumsum(r[::-1])[::-1], rtol=1e-12)
    np.testing.assert_allclose(episodes.returns, [rtg[s] for s in episodes.starts])


def sampler_for(lengths, K=5, scale=0.01):
    episodes = episodes_from_dataset(make_dataset(lengths))
    mean, std = episodes.observations.mean(0), episodes.observations.std(0) + 1e-6
    return episodes, WindowSampler(episodes, K, scale, mean, std, max_ep_len=1000), mean, std


def test_windows_lie_inside_episodes_left_padded_and_scaled_once():
    lengths, K, scale = [3, 12, 7, 1], 5, 0.01
    episodes, sampler, mean, std = sampler_for(lengths, K, scale)
    rtg = episodes.returns_to_go()
    batch = sampler.sample(512, torch.Generator().manual_seed(0))
    assert batch["states"].shape == (512, K, OBS) and batch["mask"].shape == (512, K)
    for b in range(512):
        m = batch["mask"][b].numpy()
        n = int(m.sum())
        assert n >= 1 and not m[: K - n].any() and m[K - n :].all()  # pads only on the left
        t = batch["timesteps"][b, K - n :].numpy()
        assert (np.diff(t) == 1).all()
        # find the episode from the first real state
        state = batch["states"][b, K - n].numpy() * std + mean
        row = int(np.argmin(np.abs(episodes.observations - state).sum(1)))
        e = int(np.searchsorted(episodes.starts, row, side="right") - 1)
        assert row - episodes.starts[e] == t[0]
        rows = np.arange(row, row + n)
        assert rows[-1] < episodes.starts[e] + episodes.lengths[e]  # inside the episode
        np.testing.assert_allclose(batch["actions"][b, K - n :].numpy(), episodes.actions[rows])
        np.testing.assert_allclose(batch["returns_to_go"][b, K - n :].numpy(), rtg[rows] * scale, rtol=1e-5, atol=1e-6)
        assert (batch["states"][b, : K - n] == 0).all()


def test_episodes_are_drawn_in_proportion_to_their_length():
    lengths = [10, 30, 60]
    episodes, sampler, *_ = sampler_for(lengths)
    freq = np.bincount(drawn_episodes(sampler, episodes, 30_000, seed=1), minlength=3) / 30_000
    np.testing.assert_allclose(freq, np.array(lengths) / 100, atol=0.015)
    # and the start step is uniform over the episode: pads appear exactly for starts near its end
    batch = sampler.sample(20_000, torch.Generator().manual_seed(2))
    padded = (~batch["mask"]).any(1).float().mean().item()
    # a window is padded when start > L - K; expected share = sum_e p_e * min(K-1, L_e) / L_e
    expected = sum(n / 100 * min(4, n) / n for n in lengths)
    assert abs(padded - expected) < 0.02


def test_start_share_draws_that_share_of_windows_from_the_episodes_first_steps():
    lengths, K = [200, 400], 5
    episodes, _, mean, std = sampler_for(lengths, K)

    def starts(**kw) -> torch.Tensor:  # each window's start step: its first real (unpadded) one
        sampler = WindowSampler(episodes, K, 0.01, mean, std, max_ep_len=1000, **kw)
        batch = sampler.sample(20_000, torch.Generator().manual_seed(3))
        first = K - batch["mask"].sum(1, keepdim=True)  # windows cut at the episode's end are left-padded
        return batch["timesteps"].gather(1, first).squeeze(1)

    assert torch.equal(starts(start_share=0.0, start_steps=50), starts())  # 0: the paper's batches, bit for bit
    # an episode in proportion to its length, then a start uniform in it: 50/200 x 1/3 + 50/400 x 2/3
    uniform = 2 * 50 / 600
    assert abs((starts() < 50).float().mean().item() - uniform) < 0.01
    assert abs((starts(start_share=0.25, start_steps=50) < 50).float().mean().item() - (0.25 + 0.75 * uniform)) < 0.015


def test_empty_episodes_are_refused_by_name():
    with pytest.raises(DTLabError, match="episode 1 has no steps .* drop empty episodes"):
        episodes_from_dataset(make_dataset([3, 0, 4]))
    with pytest.raises(DTLabError, match="episode 2 has no steps"):
        episodes_from_dataset(make_dataset([3, 4, 0]))


def test_an_episode_longer_than_the_timestep_table_is_refused():
    episodes = episodes_from_dataset(make_dataset([5, 9]))
    WindowSampler(episodes, 4, 0.001, np.zeros(OBS), np.ones(OBS), max_ep_len=9)  # fits exactly
    with pytest.raises(DTLabError, match="episode 1 has 9 steps, more than .* env.max_ep_len=8 rows"):
        WindowSampler(episodes, 4, 0.001, np.zeros(OBS), np.ones(OBS), max_ep_len=8)


def test_module_splits_whole_episodes_and_normalizes_with_train_stats():
    ds = make_dataset([20] * 10)
    dm = TrajectoryDataModule(
        load_episodes(lambda: ds, OBS, ACT), max_ep_len=100, context_length=4, batch_size=8, val_fraction=0.2
    )
    dm.setup()
    assert dm.train.num_episodes == 8 and dm.val.num_episodes == 2
    # which dataset rows went where, found by their first observation
    first = {tuple(np.asarray(o[0], dtype=np.float32)): e for e, o in enumerate(ds["observations"])}
    val = {first[tuple(dm.val.observations[s])] for s in dm.val.starts}
    train = {first[tuple(dm.train.observations[s])] for s in dm.train.starts}
    assert len(val) == 2 and val.isdisjoint(train) and val | train == set(range(10))
    train_steps = np.concatenate([np.asarray(ds["observations"][e], dtype=np.float64) for e in sorted(train)])
    np.testing.assert_allclose(dm.state_mean, train_steps.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dm.state_std, train_steps.std(0) + 1e-6, rtol=1e-5)
    batches = list(dm.val_dataloader())
    assert len(batches) == dm.val_batches
    assert torch.equal(batches[0]["states"], list(dm.val_dataloader())[0]["states"])  # fixed val set


def test_embedded_sample_loads():
    episodes = episodes_from_dataset(load_sample())
    assert SAMPLE_PATH.stat().st_size <= 8e6  # issue 30: at most 8 MB
    assert episodes.observations.shape[1] == 17 and episodes.actions.shape[1] == 6
    assert episodes.num_episodes == 100 and (episodes.lengths == 1000).all()


def test_the_default_run_asks_for_the_samples_two_behaviours(make_cfg):
    """dataset=sample (the default) evaluates at its medium and expert episodes' mean returns,
    and any target_return= given still wins."""
    returns = episodes_from_dataset(load_sample()).returns  # 12 medium episodes, then 88 expert
    assert list(make_cfg().target_return["values"]) == [round(returns[:12].mean()), round(returns[12:].mean())]
    assert make_cfg("target_return=paper").target_return["values"] == [6000.0, 12000.0]
    assert make_cfg("dataset=local", "dataset.path=x.parquet").target_return["values"] == [6000.0, 12000.0]


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        (Dataset.from_dict({"observations": [[[0.0] * 3]], "rewards": [[1.0]]}), "lacks column(s) ['actions']"),
        (Dataset.from_dict({"observations": [], "actions": [], "rewards": []}), "no episodes"),
        (
            Dataset.from_dict({"observations": [[[0.0] * 3] * 2], "actions": [[[0.0] * 2]], "rewards": [[1.0, 1.0]]}),
            "episode 0 has 2 observations but 1 actions",
        ),
        (
            Dataset.from_dict(
                {"observations": [[[0.0] * 3] * 2], "actions": [[[0.0] * 2] * 2], "rewards": [[1.0, float("nan")]]}
            ),
            "rewards hold NaN or Inf at episode 0, step 1",
        ),
    ],
)
def test_bad_episodes_fail_with_a_clear_message(dataset, message):
    with pytest.raises(
        DTLabError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")
    ):
        episodes_from_dataset(dataset)


def test_wrong_dims_name_both_sizes():
    with pytest.raises(DTLabError, match="observation size 4 .* expects 17"):
        load_episodes(lambda: make_dataset([5], obs=4), obs_dim=17, act_dim=ACT)


def test_missing_path_is_one_clear_error(tmp_path):
    with pytest.raises(DTLabError, match="matches no file"):
        load_local(str(tmp_path / "nope.parquet"))
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(DTLabError, match="is not a Parquet file"):
        load_local(str(tmp_path / "x.parquet"))
    # path=None was the embedded sample; a config written then is refused in one line
    with pytest.raises(DTLabError, match=r"dataset.path=null: give a file .* dataset=sample"):
        load_local(None)


def reference_pct_traj(returns: np.ndarray, lengths: np.ndarray, pct: float) -> set[int]:
    """The DT reference code's rule (kzl/decision-transformer, gym/experiment.py), as written there."""
    num_timesteps = max(int(pct * lengths.sum()), 1)
    sorted_inds = np.argsort(returns)
    num_trajectories, timesteps, ind = 1, lengths[sorted_inds[-1]], len(returns) - 2
    while ind >= 0 and timesteps + lengths[sorted_inds[ind]] <= num_timesteps:
        timesteps += lengths[sorted_inds[ind]]
        num_trajectories += 1
        ind -= 1
    return set(sorted_inds[-num_trajectories:].tolist())


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 1.0])
def test_top_fraction_keeps_the_reference_rules_episodes_and_samples_only_them(fraction):
    lengths = [7, 30, 12, 50, 3, 25, 9, 40, 18, 6]
    episodes = episodes_from_dataset(make_dataset(lengths, seed=3))
    kept = top_episodes(episodes, fraction)
    assert set(kept.tolist()) == reference_pct_traj(episodes.returns, episodes.lengths, fraction)
    sampler = WindowSampler(episodes.select(kept), 4, 0.01, np.zeros(OBS), np.ones(OBS), max_ep_len=100)
    # what sample() draws, traced back through the flat arrays of *all* episodes
    full = WindowSampler(episodes, 4, 0.01, np.zeros(OBS), np.ones(OBS), max_ep_len=100)
    batch = sampler.sample(2000, torch.Generator().manual_seed(0))
    rows = torch.cdist(batch["states"][:, -1].double(), full.states.double()).argmin(dim=1).numpy()
    drawn = set((np.searchsorted(episodes.starts, rows, side="right") - 1).tolist())
    assert drawn == set(kept.tolist())  # every kept episode is drawn, and no other


def test_the_data_module_trains_on_the_top_fraction_and_reports_it():
    ds = make_dataset([20, 5, 40, 10, 30, 15, 25, 35, 45, 50], seed=4)
    dm = TrajectoryDataModule(
        load_episodes(lambda: ds, OBS, ACT), max_ep_len=100, context_length=4, val_fraction=0.2, top_fraction=0.3
    )
    dm.setup()
    kept = top_episodes(dm.train, 0.3)
    assert dm.trained_on.num_episodes == len(kept) < dm.train.num_episodes
    assert dm.trained_on.lengths.sum() <= 0.3 * dm.train.lengths.sum() or len(kept) == 1
    np.testing.assert_allclose(dm.state_mean, dm.train.observations.mean(0))  # stats from the whole train split
    row = dm.report[-1]
    assert row["source"] == "top 0.3 of train" and row["episodes"] == len(kept)
    assert row["return_min"] == pytest.approx(dm.trained_on.returns.min(), rel=1e-5)
