"""Does a trained DT read its return-to-go? Its actions on the data's own windows, with each
episode's returns-to-go as recorded and shifted to the other group's.

    PYTHONPATH=src python benchmarks/return_conditioning.py --ckpt RUN/checkpoints/last.ckpt [...] [--data FILE ...]

The data's episodes are split into a low- and a high-return group at --split (default: halfway
between the lowest and the highest return; the embedded sample splits into its 18 medium and 12
expert episodes). For each group and each range of timesteps, the model predicts every step's
action from the window ending there (as a rollout does), once with the recorded
returns-to-go and once with all of them moved by the difference of the two groups' mean
returns (low group up, high group down). A DT that conditions on its return fits its own
group's actions better with its own returns, and its actions move when the returns do; one
that ignores them gives the same MSE and a change near 0. Early steps matter most: there the
two groups' states are alike and only the return tells them apart. Prints a table and writes
results/return_conditioning.json.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from dtlab.checkpoint import load_checkpoint
from dtlab.data import Episodes, WindowSampler, episodes_from_dataset, load_local


def parse_ranges(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in part.split(":")) for part in text.split(",")]


@torch.inference_mode()
def probe(model: torch.nn.Module, sampler: WindowSampler, episodes: np.ndarray, steps: range, shift: float) -> dict:
    """Action MSE against the data at `steps` of `episodes`, with the recorded returns-to-go and
    with them moved by `shift` (model units), and the mean absolute change of the actions."""
    K = sampler.K
    own, moved, change = [], [], []
    for t in steps:
        first = max(t - K + 1, 0)  # the window holds steps first .. first + K - 1, step t at `pos`
        pos = t - first
        ep = torch.from_numpy(episodes[sampler.lengths.numpy()[episodes] > t])
        w = sampler.windows(ep, torch.full_like(ep, first))  # (B, K, ...)
        inputs = (w["states"], w["actions"], w["returns_to_go"], w["timesteps"], w["mask"])
        a = model(*inputs)[:, pos]  # (B, act_dim)
        a_moved = model(*inputs[:2], w["returns_to_go"] + shift * w["mask"], *inputs[3:])[:, pos]
        data = w["actions"][:, pos]
        own.append(((a - data) ** 2).mean(dim=1))
        moved.append(((a_moved - data) ** 2).mean(dim=1))
        change.append((a - a_moved).abs().mean(dim=1))
    return {
        "mse_own_return": torch.cat(own).mean().item(),
        "mse_other_groups_return": torch.cat(moved).mean().item(),
        "mean_abs_action_change": torch.cat(change).mean().item(),
    }


def measure(ckpt: str, episodes: Episodes, split: float | None, steps: list[tuple[int, int]]) -> dict:
    """The probe's rows for one checkpoint (see the module docstring), with what they were taken on."""
    module = load_checkpoint(ckpt)
    model = module.model.eval()
    returns = episodes.returns
    split = split if split is not None else (returns.min() + returns.max()) / 2
    groups = {"low": np.flatnonzero(returns < split), "high": np.flatnonzero(returns >= split)}
    if not all(len(g) for g in groups.values()):
        raise SystemExit(f"--split {split:.0f} leaves a group empty (returns {returns.min():.0f}..{returns.max():.0f})")
    gap = returns[groups["high"]].mean() - returns[groups["low"]].mean()
    sampler = WindowSampler(
        episodes,
        model.config.context_length,
        module.reward_scale,
        module.state_mean.numpy(),
        module.state_std.numpy(),
        model.config.max_ep_len,
    )
    rows = []
    for name, ids in groups.items():
        shift = (gap if name == "low" else -gap) * module.reward_scale
        for lo, hi in steps:
            fit = probe(model, sampler, ids, range(lo, hi), shift)
            rows.append({"group": name, "episodes": len(ids), "steps": [lo, hi], **fit})
    return {
        "ckpt": ckpt,
        "split": float(split),
        "return_gap": float(gap),
        "reward_scale": module.reward_scale,
        "context_length": model.config.context_length,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", nargs="+", required=True)
    parser.add_argument(
        "--data", nargs="+", default=None, help="Parquet files of episodes, concatenated (default: the embedded sample)"
    )
    parser.add_argument("--split", type=float, default=None, help="return that separates the two groups")
    parser.add_argument("--steps", type=parse_ranges, default=parse_ranges("0:20,100:120,500:520"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "return_conditioning.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    episodes = episodes_from_dataset(load_local(args.data))  # once: every checkpoint is probed on the same windows
    data = args.data or "embedded sample"
    runs = [{**measure(ckpt, episodes, args.split, args.steps), "data": data} for ckpt in args.ckpt]
    for run in runs:
        print(
            f"\n{run['ckpt']}: groups split at return {run['split']:.0f}; returns moved by "
            f"{run['return_gap']:.0f} (reward scale {run['reward_scale']})"
        )
        header = ("group", "episodes", "steps", "MSE, own return", "MSE, other group", "|change|")
        print("{:6} {:>8} {:>9} {:>16} {:>17} {:>9}".format(*header))
        for r in run["rows"]:
            steps = f"{r['steps'][0]}-{r['steps'][1] - 1}"
            print(
                f"{r['group']:6} {r['episodes']:>8} {steps:>9} {r['mse_own_return']:>16.3f} "
                f"{r['mse_other_groups_return']:>17.3f} {r['mean_abs_action_change']:>9.3f}"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": runs}, indent=2))


if __name__ == "__main__":
    main()
