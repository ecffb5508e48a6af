"""The deterministic score of a dataset's ARS behaviour policy, recovered from its own data.

    PYTHONPATH=src python benchmarks/behaviour_policy.py --data-dir ../shared/data

The medium datasets of HalfCheetah and Walker2d were collected by RL Zoo ARS agents, linear
policies (on normalized observations), with Gaussian action noise of std 0.1 added and the
result clipped to [-1, 1] (../shared/data/README.md). A dataset's mean return is the score of
that *noisy* behaviour; BC regresses on the mean action, so it clones the noise-free linear
policy, which may score differently. This script recovers the linear policy: it fits W, b so
that E[clip(clip(W s + b) + noise)] matches the recorded actions (s: the dataset's states
normalized as training normalizes them; the expectation over the noise is in closed form),
checks the fit (the residual std should equal the noise std), then rolls the fitted policy out
through dtlab's own rollout, with the noise (its returns should match the dataset's: the check
that this is the behaviour policy) and without it (the behaviour policy's deterministic score).
Prints a table and writes results/behaviour_policy.json.
"""

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dtlab.data import episodes_from_dataset, load_local
from dtlab.policy import Policy
from dtlab.rollout import DEV_SEED, normalized_score, rollout

ENVS = {  # dataset: the env the rollout runs, with D4RL's reference returns
    "halfcheetah-medium-v5": {"id": "HalfCheetah-v5", "ref_min_score": -280.178953, "ref_max_score": 12135.0},
    "walker2d-medium-v5": {"id": "Walker2d-v5", "ref_min_score": 1.629008, "ref_max_score": 4592.3},
}
NOISE_STD = 0.1


@dataclass
class LinearConfig:  # what the rollout reads of a model's config
    state_dim: int
    act_dim: int
    context_length: int = 1
    max_ep_len: int = 1000


class LinearPolicy(nn.Module):
    """clip(W s + b, -1, 1) on the last normalized state, plus clipped Gaussian noise of
    `noise_std` when it is > 0 (drawn from its own seeded generator: the behaviour policy)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, noise_std: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        self.config = LinearConfig(weight.shape[1], weight.shape[0])
        self.weight, self.bias, self.noise_std = weight, bias, noise_std
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, states: torch.Tensor, *_: object, last_only: bool = True) -> torch.Tensor:
        action = (states[:, -1] @ self.weight.T + self.bias).clamp(-1, 1)  # (B, act_dim)
        if self.noise_std > 0:
            action = action + self.noise_std * torch.randn(action.shape, generator=self.generator)
        return action.clamp(-1, 1)


def expected_clipped(mean: torch.Tensor, std: float) -> torch.Tensor:
    """E[clip(mean + n, -1, 1)] for n ~ N(0, std^2)."""
    normal = torch.distributions.Normal(0.0, 1.0)
    lo, hi = (-1 - mean) / std, (1 - mean) / std
    cdf_lo, cdf_hi = normal.cdf(lo), normal.cdf(hi)
    pdf_lo, pdf_hi = normal.log_prob(lo).exp(), normal.log_prob(hi).exp()
    return -cdf_lo + (1 - cdf_hi) + mean * (cdf_hi - cdf_lo) + std * (pdf_lo - pdf_hi)


def fit(states: torch.Tensor, actions: torch.Tensor, steps: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """W (act_dim, obs_dim), b (act_dim,): least squares, then refined on the clipped model."""
    x = torch.cat([states, torch.ones(len(states), 1)], 1).double()
    solution = torch.linalg.lstsq(x, actions.double()).solution  # (obs_dim + 1, act_dim)
    params = solution.T.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([params], max_iter=steps, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = (expected_clipped((x @ params.T).clamp(-1, 1), NOISE_STD) - actions).pow(2).mean()
        value.backward()
        return value

    optimizer.step(loss)
    params = params.detach().float()
    return params[:, :-1], params[:, -1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--episodes", type=int, default=20, help="per rollout")
    # the development seeds: this measures a floor that BC's budget is judged against
    parser.add_argument("--seed", type=int, default=DEV_SEED, help="env seeds: seed .. seed + episodes - 1")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "behaviour_policy.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for name, env in ENVS.items():
        episodes = episodes_from_dataset(load_local(str(args.data_dir / f"{name}.parquet")))
        obs = torch.from_numpy(episodes.observations).float()
        acts = torch.from_numpy(episodes.actions).float()
        mean, std = obs.mean(0), obs.std(0) + 1e-6
        states = (obs - mean) / std
        weight, bias = fit(states, acts)
        mean_action = (states @ weight.T + bias).clamp(-1, 1)
        inside = (mean_action.abs() < 0.7) & (acts.abs() < 0.999)  # where neither clip acts
        residual_std = float((acts - mean_action)[inside].std())
        env = {**env, "max_episode_steps": 1000}
        row = {
            "dataset_return_mean": float(episodes.returns.mean()),
            "dataset_return_std": float(episodes.returns.std()),
            "residual_std": residual_std,
            "noise_std": NOISE_STD,
        }
        for label, noise in (("noisy", NOISE_STD), ("deterministic", 0.0)):
            policy = Policy(LinearPolicy(weight, bias, noise, args.seed), mean, std, 1.0)
            out = rollout(policy, env, [0.0], args.episodes, seed=args.seed, progress=False)
            summary = out["summary"][0]
            row[label] = {k: summary[k] for k in ("return_mean", "return_std", "normalized_score", "episodes")}
        row["dataset_normalized"] = normalized_score(row["dataset_return_mean"], env)
        results[name] = row
    header = ["dataset", "data return", "residual std (noise 0.1)", "fitted + noise", "fitted, no noise"]
    print("| " + " | ".join([*header, "normalized: data / no noise"]) + " |")
    print("|" + " --- |" * (len(header) + 1))
    for name, r in results.items():
        noisy, det = r["noisy"], r["deterministic"]
        cells = [
            name,
            f"{r['dataset_return_mean']:.0f} +- {r['dataset_return_std']:.0f}",
            f"{r['residual_std']:.3f}",
            f"{noisy['return_mean']:.0f} +- {noisy['return_std']:.0f}",
            f"{det['return_mean']:.0f} +- {det['return_std']:.0f}",
            f"{r['dataset_normalized']:.1f} / {det['normalized_score']:.1f}",
        ]
        print("| " + " | ".join(cells) + " |")
    seeds = [args.seed, args.seed + args.episodes - 1]
    setup = {"episodes": args.episodes, "env_seeds": seeds, "torch": torch.__version__}
    args.out.write_text(json.dumps({"datasets": results, "setup": setup}, indent=2) + "\n")


if __name__ == "__main__":
    main()
