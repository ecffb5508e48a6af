"""What a Decision Transformer sees, built in one place: normalized states, scaled
returns-to-go, the left-padded K-step window, and `Policy`, a model with its normalization.

Training windows (`dtlab.data.WindowSampler`), rollouts (`dtlab.rollout`) and `PolicyModule.act`
all call these functions, so no convention (normalization, scaling, padding, timesteps) can
differ between what the model was trained on and what it is shown when it acts.
No gymnasium, MuJoCo or Lightning here: weight conversion (`dtlab.hf`) imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from dtlab import DTLabError
from dtlab.model import squashed_sample

if TYPE_CHECKING:
    from dtlab.model import DecisionTransformer

Array = np.ndarray | torch.Tensor


def normalize_states(observations: Array, state_mean: Array, state_std: Array) -> torch.Tensor:
    """(..., obs_dim) raw observations -> (obs - mean) / std, in float32 (the data's precision),
    so that the same observation normalizes to the same bits in training and at acting time."""
    obs = torch.as_tensor(observations, dtype=torch.float32)
    mean = torch.as_tensor(state_mean, dtype=torch.float32, device=obs.device)
    std = torch.as_tensor(state_std, dtype=torch.float32, device=obs.device)
    return (obs - mean) / std


def scale_returns(returns_to_go: Array, reward_scale: float) -> torch.Tensor:
    """Raw returns-to-go (in return units) -> model units: times reward_scale (0.001 in the
    paper), computed in float64 and stored as float32."""
    return (torch.as_tensor(returns_to_go, dtype=torch.float64) * reward_scale).float()


def windows(
    states: torch.Tensor,
    actions: torch.Tensor,
    returns_to_go: torch.Tensor,
    sequence_start: torch.Tensor,
    first: torch.Tensor,
    count: torch.Tensor,
    K: int,
    timesteps: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Gather K-step windows from sequences laid end to end in flat arrays.

    states (N, obs_dim), actions (N, act_dim), returns_to_go (N,) hold every step of every
    sequence (an episode of the data, or one env's history in a rollout), already normalized
    and scaled. Window b holds `count[b]` (1..K) real steps, steps first[b] .. first[b] +
    count[b] - 1 of the sequence that begins at flat row sequence_start[b]; it is left-padded
    to K. Pads have mask False and all inputs 0. Timesteps are the step within the sequence,
    or gathered from `timesteps` (N,) int64 where a sequence does not start at step 0.
    All index tensors are (B,) int64. Returns the model's inputs: states (B, K, obs_dim),
    actions (B, K, act_dim), returns_to_go (B, K), timesteps (B, K), mask (B, K) bool.
    """
    j = torch.arange(K, device=states.device)  # (K,)
    pad = K - count  # (B,)
    mask = j[None, :] >= pad[:, None]  # (B, K)
    t = (first[:, None] + j[None, :] - pad[:, None]).clamp(min=0)  # (B, K); pads point at step 0
    rows = sequence_start[:, None] + t  # (B, K)
    m = mask[..., None]
    return {
        "states": states[rows] * m,  # (B, K, obs_dim)
        "actions": actions[rows] * m,  # (B, K, act_dim)
        "returns_to_go": returns_to_go[rows] * mask,  # (B, K)
        "timesteps": (t if timesteps is None else timesteps[rows]) * mask,  # (B, K)
        "mask": mask,  # (B, K)
    }


def check_timesteps(last_timestep: int, max_ep_len: int | None, what: str, fix: str) -> None:
    """A timestep past the model's table would have to share its last row (the reference code
    clamps it there silently): refuse it, saying `what` reached it and the `fix`. `max_ep_len`
    None: the model has no table (model.timestep_embedding=false, BC's MLP), so any timestep goes."""
    if max_ep_len is not None and last_timestep >= max_ep_len:
        raise DTLabError(
            f"{what} reaches timestep {last_timestep}, but the model's timestep table has {max_ep_len} rows "
            f"(env.max_ep_len): {fix}"
        )


@dataclass
class Policy:
    """The bare model plus what it needs to read raw observations and returns."""

    model: DecisionTransformer
    state_mean: torch.Tensor  # (obs_dim,)
    state_std: torch.Tensor  # (obs_dim,)
    reward_scale: float

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> Policy:
        """From a PolicyModule (fresh, or from `PolicyModule.load_from_checkpoint`)."""
        return cls(module.model, module.state_mean, module.state_std, module.reward_scale)

    @property
    def context_length(self) -> int:
        return self.model.config.context_length

    @property
    def max_ep_len(self) -> int:
        return self.model.config.max_ep_len

    @property
    def timestep_rows(self) -> int | None:
        """The rows of the model's timestep table, None for a model without one: the longest
        episode it can act in whole."""
        return self.max_ep_len if getattr(self.model, "embed_timestep", None) is not None else None

    def normalize(self, observations: Array) -> torch.Tensor:
        return normalize_states(observations, self.state_mean, self.state_std).to(self.state_mean.device)

    def scale(self, returns_to_go: Array) -> torch.Tensor:
        return scale_returns(returns_to_go, self.reward_scale).to(self.state_mean.device)

    def act(self, window: dict[str, torch.Tensor]) -> torch.Tensor:
        """The next action (B, act_dim) for windows built by `windows` (the last step of each is
        the one to act at). The model's mode (train/eval) is the caller's."""
        return self.model(*self._inputs(window), last_only=True)

    def sample(self, window: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """A next action (B, act_dim) drawn from the gaussian head's squashed Gaussian, its
        standard normal noise from `generator` (a CPU one, so that a seed draws the same
        actions on any device): exploration. Windows and mode as in `act`."""
        mu, log_std = self.model.action_distribution(*self._inputs(window), last_only=True)
        noise = torch.randn(mu.shape, generator=generator).to(mu.device)
        return squashed_sample(mu, log_std, noise)[0]

    @staticmethod
    def _inputs(window: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
        """The model's inputs from a window: states, actions, returns-to-go, timesteps, mask."""
        mask = window["mask"]
        if bool(mask.all()):  # nothing padded: plain causal attention is cheaper than a mask
            mask = None
        return window["states"], window["actions"], window["returns_to_go"], window["timesteps"], mask
