"""Offline trajectories: loading, checking, returns-to-go, state statistics, window sampling.

Episodes come as HF `datasets` rows in the schema of the hub dataset
`edbeeching/decision_transformer_gym_replay`: one row per episode with `observations`
[T, obs_dim], `actions` [T, act_dim], `rewards` [T] (and `dones` [T], unused: returns-to-go
end with the episode either way). They are flattened once into NumPy arrays, steps of all
episodes end to end, so batches are gathered by index arithmetic with no Python loop.

Over 400 lines: the sources (`load_*`, half the module) could be a module of their own, but
every dataset config and every run record names them `dtlab.data.load_*`, and the report's
setup keys hash `dataset._target_`: moved, new runs would no longer pool with the committed
records.
"""

from __future__ import annotations

import functools
import glob
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from dtlab import DTLabError
from dtlab.policy import normalize_states, scale_returns, windows
from dtlab.stats import normalized_score

SAMPLE_PATH = Path(__file__).parent / "assets" / "halfcheetah-sample-v5.parquet"
HUB_REPO = "edbeeching/decision_transformer_gym_replay"
# The repo's loading script no longer runs on current `datasets`; the hub's automatic Parquet
# conversion of it does.
HUB_REVISION = "refs/convert/parquet"
COLUMNS = ("observations", "actions", "rewards")


# ---------------------------------------------------------------------------------------------
# Sources: each returns an HF Dataset with one row per episode.


def load_sample() -> datasets.Dataset:
    """The small HalfCheetah-v5 sample shipped with dtlab (dataset=sample): 12 medium and 88
    expert episodes (src/dtlab/assets/make_sample.py says where they come from)."""
    return load_local(str(SAMPLE_PATH))


def load_local(path: str | Sequence[str]) -> datasets.Dataset:
    """Episodes from Parquet files (paths or globs) or `Dataset.save_to_disk` folders.
    A list of paths is concatenated (e.g. medium + expert = D4RL's medium-expert)."""
    if path is None:  # a config from before load_sample, where path: null meant the sample
        raise DTLabError(
            "dataset.path=null: give a file with dataset.path=FILE (the embedded sample is dataset=sample, "
            "dtlab.data.load_sample, no longer a null path)"
        )
    paths = [path] if isinstance(path, str | Path) else path
    if len(paths) == 0:
        raise DTLabError("dataset.path is an empty list: give at least one Parquet file")
    parts = []
    for p in map(str, paths):
        if os.path.isdir(p):
            try:
                parts.append(datasets.load_from_disk(p))
            except FileNotFoundError as e:
                raise DTLabError(
                    f"dataset.path {p!r} is a folder but not one written by Dataset.save_to_disk "
                    f"({e}); point it at the Parquet file(s) instead"
                ) from None
            continue
        files = sorted(glob.glob(os.path.expanduser(p)))
        if not files:
            raise DTLabError(
                f"dataset.path {p!r} matches no file: give an existing Parquet file, a glob, "
                "or a folder written by Dataset.save_to_disk"
            )
        for f in files:
            try:
                # In memory, not through the HF cache: these files are small and read once.
                parts.append(datasets.Dataset(pq.read_table(f)))
            except (pa.ArrowInvalid, OSError) as e:
                raise DTLabError(f"{f!r} is not a Parquet file ({e}); convert it or fix the path") from None
    return _concatenate(parts)


def load_hub(name: str | Sequence[str], repo: str = HUB_REPO, revision: str = HUB_REVISION) -> datasets.Dataset:
    """Config(s) of the hub's D4RL copy, e.g. `halfcheetah-medium-v2`, through the HF cache
    (`HF_DATASETS_OFFLINE=1` uses a cached copy only). A list is concatenated:
    [halfcheetah-medium-v2, halfcheetah-expert-v2] is D4RL's medium-expert."""
    names = [name] if isinstance(name, str) else list(name)
    parts = []
    for n in names:
        try:
            parts.append(datasets.load_dataset(repo, n, revision=revision, split="train"))
        except Exception as e:  # noqa: BLE001 - any failure here is "could not fetch", said plainly
            reason = str(e).splitlines()[0][:200] if str(e) else ""
            raise DTLabError(
                f"could not load {repo} config {n!r} at revision {revision!r} ({type(e).__name__}: "
                f"{reason}); on a machine with access to the HF Hub run it once to fill the HF cache "
                "(then HF_DATASETS_OFFLINE=1 works), or download its Parquet file and use "
                "dataset=local dataset.path=FILE"
            ) from None
    return _concatenate(parts)


def load_hdf5(path: str) -> datasets.Dataset:
    """A file in D4RL's flat HDF5 layout (`observations`, `actions`, `rewards`, `terminals`,
    `timeouts`, one row per step), split into episodes after every terminal or timeout. Steps
    after the last episode end are dropped, as in the DT reference code: their returns-to-go
    would be cut short."""
    try:
        import h5py
    except ImportError:
        raise DTLabError("dataset=d4rl_hdf5 needs h5py: pip install 'dtlab[hdf5]'") from None
    if not os.path.isfile(path):
        raise DTLabError(f"dataset.path {path!r} is not a file: give a D4RL HDF5 file")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("observations", "actions", "rewards", "terminals", "timeouts") if k not in f]
            if missing:
                raise DTLabError(f"{path!r} lacks D4RL key(s) {missing} (has {sorted(f.keys())})")
            columns = {k: f[k][:] for k in ("observations", "actions", "rewards", "terminals", "timeouts")}
    except OSError as e:
        raise DTLabError(f"{path!r} is not an HDF5 file ({e})") from None
    ends = np.flatnonzero(columns["terminals"] | columns["timeouts"]) + 1
    if len(ends) == 0:
        raise DTLabError(f"{path!r} has no terminal or timeout: no complete episode to train on")
    n = ends[-1]
    return episodes_to_dataset(
        columns["observations"][:n],
        columns["actions"][:n],
        columns["rewards"][:n],
        columns["terminals"][:n].astype(bool),
        np.diff(ends, prepend=0),
    )


def load_minari(name: str, download: bool = False) -> datasets.Dataset:
    """A Minari dataset, e.g. `mujoco/halfcheetah/medium-v0`, from the local Minari store
    (`MINARI_DATASETS_PATH`); `download=True` fetches it first. Minari keeps T+1 observations
    per episode (the last is the one after the final action): it is dropped. Terminations are
    our dones; truncations (time limits) are not."""
    minari = _import_minari()
    try:
        ds = minari.load_dataset(name, download=download)
    except Exception as e:  # noqa: BLE001 - minari raises several kinds for "not here"
        raise DTLabError(
            f"Minari dataset {name!r} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "list local ones with `minari list local`, or set dataset.download=true where the network is reachable"
        ) from None
    episodes = list(ds.iterate_episodes())
    return episodes_to_dataset(
        np.concatenate([e.observations[:-1] for e in episodes]),
        np.concatenate([e.actions for e in episodes]),
        np.concatenate([e.rewards for e in episodes]),
        np.concatenate([e.terminations for e in episodes]),
        np.array([len(e.rewards) for e in episodes]),
    )


def minari_env(name: str, key: str | None = None) -> dict | object:
    """An env config (see conf/env/) for the env a Minari dataset was recorded in, with the
    dataset's own reference returns (they are not D4RL's); or its entry `key`."""
    env = _minari_env(name)
    return env if key is None else env[key]


@functools.cache
def _minari_env(name: str) -> dict:
    minari = _import_minari()
    try:
        ds = minari.load_dataset(name)
    except Exception as e:  # noqa: BLE001
        raise DTLabError(f"env=from_dataset: Minari dataset {name!r} cannot be loaded ({e})") from None
    spec, meta = ds.env_spec, ds.storage.metadata
    if meta.get("ref_min_score") is None or meta.get("ref_max_score") is None:
        raise DTLabError(
            f"Minari dataset {name!r} has no reference returns: choose an env config with D4RL's (env=halfcheetah ...)"
        )
    return {
        "id": spec.id,
        "obs_dim": int(ds.observation_space.shape[0]),
        "act_dim": int(ds.action_space.shape[0]),
        "max_episode_steps": int(spec.max_episode_steps),
        "ref_min_score": float(meta["ref_min_score"]),
        "ref_max_score": float(meta["ref_max_score"]),
    }


def _import_minari():  # noqa: ANN202 - the module
    try:
        import minari
    except ImportError:
        raise DTLabError("dataset=minari needs the minari package: pip install 'dtlab[minari]'") from None
    return minari


def load_mixture(
    sources: Mapping[str, Callable[[], datasets.Dataset]], weights: Mapping[str, float] | None = None
) -> datasets.Dataset:
    """Several sources in one dataset. Without weights, episodes are drawn in proportion to
    their length across all sources, as if concatenated. With weights (one per source), source
    s gets share weights[s] / sum(weights) of all windows, spread over its episodes by length."""
    if not sources:
        raise DTLabError("dataset=mixture needs at least one source under dataset.sources")
    if weights is not None:
        if set(weights) != set(sources):
            raise DTLabError(
                f"dataset.weights names {sorted(weights)} but dataset.sources are {sorted(sources)}: "
                "give one weight each"
            )
        if min(weights.values()) < 0 or sum(weights.values()) <= 0:
            raise DTLabError(f"dataset.weights {dict(weights)} must be >= 0 and not all 0")
    parts = []
    for name, load in sources.items():
        ds = load().select_columns(list(COLUMNS))
        steps = int(pc.sum(pc.list_value_length(ds.data.column("rewards"))).as_py() or 0)
        factor = 1.0 if weights is None else weights[name] / max(steps, 1)
        ds = ds.add_column("source", [name] * len(ds)).add_column("sampling_weight", [factor] * len(ds))
        parts.append(ds)
    return _concatenate(parts)


def _concatenate(parts: list[datasets.Dataset]) -> datasets.Dataset:
    if len(parts) == 1:
        return parts[0]
    features = parts[0].features
    try:
        return datasets.concatenate_datasets([p.select_columns(list(features)).cast(features) for p in parts])
    except (ValueError, KeyError, TypeError) as e:
        raise DTLabError(f"datasets cannot be combined: their columns differ ({e})") from None


def episodes_to_dataset(
    observations: np.ndarray, actions: np.ndarray, rewards: np.ndarray, dones: np.ndarray, lengths: np.ndarray
) -> datasets.Dataset:
    """Flat per-step arrays and episode lengths as an HF Dataset in the hub's schema, built from
    Arrow offsets (no per-episode Python lists)."""
    episode_offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))

    def nested(values: np.ndarray) -> pa.Array:
        values = np.asarray(values)
        if values.ndim == 2:
            width = values.shape[1]
            step_offsets = pa.array(np.arange(len(values) + 1, dtype=np.int32) * width)
            steps = pa.ListArray.from_arrays(step_offsets, pa.array(values.astype(np.float32).ravel()))
        else:
            steps = pa.array(values.astype(bool) if values.dtype == bool else values.astype(np.float32))
        return pa.ListArray.from_arrays(episode_offsets, steps)

    table = pa.table(
        {
            "observations": nested(observations),
            "actions": nested(actions),
            "rewards": nested(rewards),
            "dones": nested(np.asarray(dones, dtype=bool)),
        }
    )
    return datasets.Dataset(table)


# ---------------------------------------------------------------------------------------------
# Episodes as flat arrays.


@dataclass
class Episodes:
    """All steps of all episodes end to end; episode e is rows starts[e]:starts[e]+lengths[e]."""

    observations: np.ndarray  # (N, obs_dim) float32
    actions: np.ndarray  # (N, act_dim) float32
    rewards: np.ndarray  # (N,) float32
    starts: np.ndarray  # (E,) int64
    lengths: np.ndarray  # (E,) int64
    weights: np.ndarray  # (E,) float64: an episode is drawn with probability ~ length * weight
    sources: np.ndarray  # (E,) str: the source each episode came from (dataset=mixture)

    @property
    def num_episodes(self) -> int:
        return len(self.lengths)

    @property
    def returns(self) -> np.ndarray:
        """(E,) undiscounted return of every episode."""
        return np.add.reduceat(self.rewards.astype(np.float64), self.starts) if len(self.starts) else np.zeros(0)

    def returns_to_go(self) -> np.ndarray:
        """(N,) float64: R_t = sum of rewards from step t to the end of its episode, i.e. the
        reversed cumulative sum within each episode."""
        cumsum = np.concatenate([[0.0], np.cumsum(self.rewards, dtype=np.float64)])
        ends = np.repeat(self.starts + self.lengths, self.lengths)
        return cumsum[ends] - cumsum[:-1]

    def locate(self, row: int) -> tuple[int, int]:
        """(episode, step in it) of flat row `row`."""
        e = int(np.searchsorted(self.starts, row, side="right") - 1)
        return e, int(row - self.starts[e])

    def select(self, episode_ids: np.ndarray) -> Episodes:
        lengths = self.lengths[episode_ids]
        starts = (np.cumsum(lengths) - lengths).astype(np.int64)
        rows = np.arange(lengths.sum()) + np.repeat(self.starts[episode_ids] - starts, lengths)
        return Episodes(
            self.observations[rows],
            self.actions[rows],
            self.rewards[rows],
            starts,
            lengths,
            self.weights[episode_ids],
            self.sources[episode_ids],
        )


def _flat_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list<float> or list<list<float>> column as (episode lengths (E,), values (N,) or (N, D)).
    Reads Arrow offsets and values directly: ~100x faster than NumPy-formatting nested lists."""
    col = table.column(name).combine_chunks()
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64)
    steps = col.flatten()
    if pa.types.is_list(steps.type) or pa.types.is_large_list(steps.type):
        dims = pc.list_value_length(steps).to_numpy(zero_copy_only=False)
        if len(dims) and dims.min() != dims.max():
            step = int(np.argmax(dims != dims[0]))
            raise DTLabError(
                f"column {name!r} has rows of sizes {dims[0]} and {dims[step]}: every step must have the same size"
            )
        width = int(dims[0]) if len(dims) else 0
        values = steps.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, width)
    else:
        values = steps.to_numpy(zero_copy_only=False).astype(np.float32)
    return lengths, values


def episodes_from_dataset(ds: datasets.Dataset) -> Episodes:
    """Flatten and check a one-row-per-episode dataset. Raises DTLabError on anything that
    would train silently wrong: missing columns, ragged episodes, NaN/Inf, no episodes."""
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise DTLabError(
            f"dataset lacks column(s) {missing} (has {ds.column_names}); it needs one row per "
            f"episode with columns {list(COLUMNS)} as in {HUB_REPO}"
        )
    if len(ds) == 0:
        raise DTLabError("dataset has no episodes: check dataset.path")
    table = ds.with_format("arrow")[:]
    lengths, observations = _flat_column(table, "observations")
    act_lengths, actions = _flat_column(table, "actions")
    rew_lengths, rewards = _flat_column(table, "rewards")
    for name, other in (("actions", act_lengths), ("rewards", rew_lengths)):
        if not np.array_equal(lengths, other):
            e = int(np.argmax(lengths != other))
            raise DTLabError(
                f"episode {e} has {lengths[e]} observations but {other[e]} {name}: "
                "every step needs one observation, action and reward"
            )
    if (lengths == 0).any():
        # An empty episode would take the next one's first reward as its return (reduceat).
        e = int(np.argmax(lengths == 0))
        raise DTLabError(
            f"episode {e} has no steps ({int((lengths == 0).sum())} of {len(lengths)} episodes are empty): "
            "drop empty episodes from the dataset"
        )
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    E = len(lengths)
    weights = (
        np.asarray(ds["sampling_weight"], dtype=np.float64) if "sampling_weight" in ds.column_names else np.ones(E)
    )
    sources = np.asarray(ds["source"] if "source" in ds.column_names else ["dataset"] * E)
    episodes = Episodes(observations, actions, rewards, starts, lengths, weights, sources)
    for name, values in (("observations", observations), ("actions", actions), ("rewards", rewards)):
        bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        if bad.any():
            e, t = episodes.locate(int(np.argmax(bad)))
            raise DTLabError(
                f"{name} hold NaN or Inf at episode {e}, step {t}: clean or drop that episode before training"
            )
    return episodes


def load_episodes(
    load: Callable[[], datasets.Dataset],
    obs_dim: int,
    act_dim: int,
    action_bounds: tuple[np.ndarray, np.ndarray] | None = None,
) -> Episodes:
    """Load episodes with `load` (a `load_*` function of this module, chosen by the `dataset`
    config group) and check them against the env: observation and action sizes, and actions
    inside the env's bounds (low, high), each (act_dim,). Raises DTLabError naming the fix."""
    episodes = episodes_from_dataset(load())
    dims = episodes.observations.shape[1], episodes.actions.shape[1]
    if dims != (obs_dim, act_dim):
        raise DTLabError(
            f"dataset has observation size {dims[0]} and action size {dims[1]}, but the env "
            f"expects {obs_dim} and {act_dim}: choose the env the data was recorded in (env=...)"
        )
    if action_bounds is not None:
        # The policy's tanh head cannot reach actions outside the bounds: such data was
        # recorded in other units or in another env. The tolerance forgives rounding only.
        low, high = action_bounds
        outside = (episodes.actions < low - 1e-4) | (episodes.actions > high + 1e-4)  # (N, act_dim)
        if outside.any():
            row = int(np.argmax(outside.any(axis=1)))
            dim = int(np.argmax(outside[row]))
            e, t = episodes.locate(row)
            raise DTLabError(
                f"action {episodes.actions[row, dim]:g} at episode {e}, step {t}, dimension {dim} lies "
                f"outside the env's bounds [{low[dim]:g}, {high[dim]:g}]: rescale or clip the dataset's "
                "actions, or choose the env the data was recorded in (env=...)"
            )
    return episodes


# ---------------------------------------------------------------------------------------------
# Window sampling.


def check_context_length(context_length: int, max_ep_len: int) -> None:
    """A window of K steps must fit in the env's episodes (their timesteps embed up to max_ep_len)."""
    if context_length > max_ep_len:
        raise DTLabError(
            f"context length K={context_length} exceeds the env's episode limit env.max_ep_len="
            f"{max_ep_len}: set model.context_length <= {max_ep_len}"
        )


def check_episode_lengths(episodes: Episodes, max_ep_len: int) -> None:
    """Every step's timestep must have its own row in the model's timestep table (max_ep_len
    rows, the env's real episode limit); a longer episode would share the last row."""
    longest = int(episodes.lengths.max())
    if longest > max_ep_len:
        e = int(np.argmax(episodes.lengths))
        raise DTLabError(
            f"episode {e} has {longest} steps, more than the model's timestep table of env.max_ep_len="
            f"{max_ep_len} rows: set env.max_ep_len to the episode limit the data was recorded with"
        )


class WindowSampler:
    """Draws K-step windows the DT paper's way: an episode with probability proportional to
    its length, a start step uniform in it, the window cut at the episode's end and
    left-padded to K (mask False at pads). One call gathers a whole batch by index arithmetic.

    States are normalized with (state_mean, state_std) and returns-to-go multiplied by
    reward_scale once, here, by the functions the rollout uses too (dtlab.policy).

    start_share > 0 (not the paper's): that share of each batch's windows starts uniformly in
    its episode's first `start_steps` steps instead. Each episode shows its start from rest
    once, so a uniform draw rarely sees it; a DT that has not learned it stands still or
    flips there (docs/notes.md#return-conditioning). 0 draws exactly the paper's batches."""

    def __init__(
        self,
        episodes: Episodes,
        context_length: int,
        reward_scale: float,
        state_mean: np.ndarray,
        state_std: np.ndarray,
        max_ep_len: int,
        start_share: float = 0.0,
        start_steps: int = 100,
    ) -> None:
        check_episode_lengths(episodes, max_ep_len)
        self.K = context_length
        self.start_share, self.start_steps = start_share, start_steps
        self.states = normalize_states(episodes.observations, state_mean, state_std)
        self.actions = torch.from_numpy(episodes.actions)
        self.returns_to_go = scale_returns(episodes.returns_to_go(), reward_scale)
        self.starts = torch.from_numpy(episodes.starts)
        self.lengths = torch.from_numpy(episodes.lengths)
        probs = self.lengths.double() * torch.from_numpy(episodes.weights)
        self.episode_probs = probs / probs.sum()

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        episode = torch.multinomial(self.episode_probs, batch_size, replacement=True, generator=generator)
        length = self.lengths[episode]  # (B,)
        start = (torch.rand(batch_size, generator=generator, dtype=torch.float64) * length).long()  # (B,)
        if self.start_share > 0:  # (no extra draws at 0: old runs' batches stay bit-identical)
            early = torch.rand(batch_size, generator=generator, dtype=torch.float64) < self.start_share
            head = torch.clamp(length, max=self.start_steps)
            early_start = (torch.rand(batch_size, generator=generator, dtype=torch.float64) * head).long()
            start = torch.where(early, early_start, start)
        return self.windows(episode, start)

    def windows(self, episode: torch.Tensor, start: torch.Tensor) -> dict[str, torch.Tensor]:
        """The windows beginning at step `start` of `episode` (both (B,)), left-padded to K."""
        count = torch.clamp(self.lengths[episode] - start, max=self.K)  # (B,) real steps in window
        return windows(self.states, self.actions, self.returns_to_go, self.starts[episode], start, count, self.K)


def top_episodes(episodes: Episodes, fraction: float) -> np.ndarray:
    """%BC's data (the DT reference code's `pct_traj` rule): the highest-return episodes, taken
    from the best down while their total length stays within `fraction` of all transitions
    (at least the best one). Returns their ids, in dataset order."""
    if fraction >= 1.0:
        return np.arange(episodes.num_episodes)
    budget = max(int(fraction * episodes.lengths.sum()), 1)
    order = np.argsort(episodes.returns, kind="stable")[::-1]  # best first
    taken = np.cumsum(episodes.lengths[order])
    # the best episode always, then each next one while the running total fits the budget
    keep = 1 + int(np.argmax(taken[1:] > budget)) if (taken[1:] > budget).any() else len(order)
    return np.sort(order[:keep])


# Random streams of a training step, each seeded by (seed, rank, step, stream) alone: the
# batch, dropout, the gaussian head's entropy sample, an online round's exploration noise.
BATCHES, DROPOUT, ENTROPY, EXPLORATION = 0, 1, 2, 3


def stream_seed(seed: int, rank: int, step: int, stream: int = BATCHES) -> int:
    """The seed of random stream `stream` (BATCHES, DROPOUT, ...) at training step `step` of
    process `rank`. It depends only on these four numbers, so a resumed run draws exactly the
    batches and dropout masks the uninterrupted run would have; and the streams are
    independent, so a dropout mask is no function of the batch drawn beside it."""
    return int(np.random.SeedSequence([seed, rank, step, stream]).generate_state(1)[0])


def dataset_report(
    episodes: Episodes, ref_scores: Sequence[float] | None = None, kept: np.ndarray | None = None, kept_name: str = ""
) -> list[dict]:
    """One row per source (and one for all, when there are several): what was loaded; and one
    for the episodes `kept` for training (%BC's top fraction), named `kept_name`."""
    returns = episodes.returns
    names = list(dict.fromkeys(episodes.sources))
    rows = []
    selections = [(name, episodes.sources == name) for name in names]
    if len(names) > 1:
        selections.append(("all", np.ones(len(returns), dtype=bool)))
    if kept is not None:
        selections.append((kept_name, np.isin(np.arange(len(returns)), kept)))
    for name, of in selections:
        r, n = returns[of], episodes.lengths[of]
        row = {
            "source": str(name),
            "episodes": int(of.sum()),
            "transitions": int(n.sum()),
            "return_min": float(r.min()),
            "return_median": float(np.median(r)),
            "return_mean": float(r.mean()),
            "return_max": float(r.max()),
            "length_min": int(n.min()),
            "length_max": int(n.max()),
            "obs_dim": episodes.observations.shape[1],
            "act_dim": episodes.actions.shape[1],
        }
        if ref_scores is not None:
            row["normalized_mean"] = normalized_score(row["return_mean"], ref_scores)
        rows.append(row)
    return rows


def format_report(rows: Sequence[Mapping]) -> str:
    columns = list(rows[0])
    cells = [[f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)
