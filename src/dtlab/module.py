"""DTModule: a policy network as a Lightning system (loss, optimizer, schedule, logging): the
Decision Transformer, or the behaviour-cloning MLP trained the same way (`policy`).

Everything a policy needs travels in the checkpoint (state mean/std, reward scale, K, env id
and dims), so `DTModule.load_from_checkpoint(path)` alone gives a working `act()`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning as L
import numpy as np
import torch

from dtlab import DTLabError
from dtlab.data import DROPOUT, stream_seed
from dtlab.model import MLPBC, POLICIES, DecisionTransformer, DTConfig
from dtlab.policy import Policy, check_timesteps, windows


class DTModule(L.LightningModule):
    def __init__(
        self,
        env_id: str,
        state_dim: int,
        act_dim: int,
        max_ep_len: int,
        state_mean: Sequence[float],
        state_std: Sequence[float],
        reward_scale: float,
        context_length: int = 20,
        n_layer: int = 3,
        n_head: int = 1,
        n_embd: int = 128,
        dropout: float = 0.1,
        activation: str = "gelu",
        action_tanh: bool = True,
        learning_rate: float = 1e-4,
        weight_decay: float = 1e-4,
        betas: Sequence[float] = (0.9, 0.999),
        warmup_steps: int = 10_000,
        lr_schedule: str = "constant",
        compile: bool = False,
        seed: int = 0,
        policy: str = "dt",
    ) -> None:
        """Dims, env and normalization come from the env config and the data; the rest are the
        DT paper's hyperparameters (Chen et al. 2021, Table 8), its defaults, except
        `activation`: "gelu" is what every checkpoint written before this key existed used, so
        it stays the default here and they load unchanged; conf/model/small.yaml sets the
        paper's "relu".
        lr_schedule: "constant" (linear warmup, then constant, as the paper) or "cosine"
        (linear warmup, then cosine decay to 0 at trainer.max_steps).
        seed: the run's seed; the dropout masks of a training step are drawn from it.
        policy: the network, "dt" (DecisionTransformer) or "mlp_bc" (MLPBC, behaviour cloning:
        n_layer, n_embd, dropout and K size its MLP); both are trained the same way, by MSE on
        the dataset's actions at every real step of the window (conf/algo/)."""
        super().__init__()
        if lr_schedule not in ("constant", "cosine"):
            raise DTLabError(f"model.lr_schedule={lr_schedule!r} is unknown: use constant or cosine")
        if len(state_mean) != state_dim or len(state_std) != state_dim:
            raise DTLabError(
                f"state_mean/state_std have {len(state_mean)}/{len(state_std)} entries, expected {state_dim}"
            )
        self.save_hyperparameters(logger=False)  # the run config is the resolved Hydra config (dtlab.train)
        self.config = DTConfig(
            state_dim=state_dim,
            act_dim=act_dim,
            max_ep_len=max_ep_len,
            context_length=context_length,
            n_layer=n_layer,
            n_head=n_head,
            n_embd=n_embd,
            dropout=dropout,
            activation=activation,
            action_tanh=action_tanh,
        )
        if policy not in POLICIES:
            raise DTLabError(f"model.policy={policy!r} is unknown: use one of {sorted(POLICIES)}")
        self.model: DecisionTransformer | MLPBC = POLICIES[policy](self.config)
        if compile:
            self.model.compile()
        self.register_buffer("state_mean", torch.tensor(state_mean, dtype=torch.float32))
        self.register_buffer("state_std", torch.tensor(state_std, dtype=torch.float32))
        self.reward_scale = reward_scale
        # Set by dtlab.train, kept in the checkpoint for evaluation with no Hydra config at hand:
        # the env config (reference scores, paper targets) and the training data's episode returns.
        self.env_config: dict | None = None
        self.episode_returns: list[float] | None = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["dtlab"] = {"env": self.env_config, "episode_returns": self.episode_returns}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        extra = checkpoint.get("dtlab", {})
        self.env_config, self.episode_returns = extra.get("env"), extra.get("episode_returns")

    def _action_mse(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """MSE between predicted and dataset actions, over real (unpadded) steps only."""
        pred = self.model(batch["states"], batch["actions"], batch["returns_to_go"], batch["timesteps"], batch["mask"])
        mask = batch["mask"]
        err = ((pred - batch["actions"]) ** 2).mean(dim=-1)  # (B, K)
        return (err * mask).sum() / mask.sum()

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # Dropout draws from the global torch generator. Seeding it from (seed, rank, step) makes
        # step t the same whether or not the run was stopped and resumed before it: no generator
        # state has to travel in the checkpoint. Its own stream: masks independent of the batch.
        seed = stream_seed(self.hparams.seed, self.global_rank, self.global_step, DROPOUT)
        if self.device.type == "cpu":
            # the same CPU generator torch.manual_seed seeds, without its lazy seeding of every
            # accelerator backend, which formats a stack trace each call (~2.7 ms a step here)
            torch.default_generator.manual_seed(seed)
        else:
            torch.manual_seed(seed)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._action_mse(batch)
        # Stop before a non-finite loss reaches the weights: they, and every checkpoint, stay good.
        if not torch.isfinite(loss):
            raise DTLabError(
                f"train/loss is {loss.item()} at step {self.global_step}: training stopped and the "
                "checkpoints keep the last good weights; lower model.learning_rate or check the data"
            )
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # under DDP each rank validates its share of the batches: average over ranks
        self.log("val/action_mse", self._action_mse(batch), prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            self.model.parameter_groups(hp.weight_decay), lr=hp.learning_rate, betas=tuple(hp.betas)
        )
        warmup, total = max(hp.warmup_steps, 1), self.trainer.max_steps if self.trainer else -1

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if hp.lr_schedule == "cosine" and total > warmup:
                return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @torch.inference_mode()
    def act(
        self,
        states: np.ndarray,
        actions: np.ndarray,
        returns_to_go: np.ndarray,
        timesteps: np.ndarray,
    ) -> np.ndarray:
        """The next action for one episode's history: raw states [T, obs_dim], actions
        [T, act_dim] (the last row is a placeholder for the action being chosen), raw
        returns-to-go [T] in return units, timesteps [T]. Returns the action [act_dim]."""
        hp = self.hparams
        states = np.asarray(states, dtype=np.float32)
        actions = np.asarray(actions, dtype=np.float32)
        T = len(states)
        if states.ndim != 2 or states.shape[1] != hp.state_dim:
            raise DTLabError(f"act: states must have shape [T, {hp.state_dim}], got {list(states.shape)}")
        if actions.shape != (T, hp.act_dim):
            raise DTLabError(f"act: actions must have shape [{T}, {hp.act_dim}], got {list(actions.shape)}")
        if np.shape(returns_to_go) != (T,) or np.shape(timesteps) != (T,):
            raise DTLabError(f"act: returns_to_go and timesteps must have shape [{T}]")
        if T == 0 or np.min(timesteps) < 0:
            raise DTLabError("act: give at least one step, with timesteps >= 0 (the step within the episode)")
        check_timesteps(int(np.max(timesteps)), hp.max_ep_len, "act: timesteps", "pass timesteps within the table")
        policy = Policy.from_module(self)
        K = hp.context_length
        first = max(T - K, 0)  # the window: the last K steps of the history, left-padded
        window = windows(
            policy.normalize(states),
            torch.as_tensor(actions, device=self.device),
            policy.scale(returns_to_go),
            torch.zeros(1, dtype=torch.long, device=self.device),
            torch.full((1,), first, device=self.device),
            torch.full((1,), T - first, device=self.device),
            K,
            timesteps=torch.as_tensor(np.asarray(timesteps, dtype=np.int64), device=self.device),
        )
        training = self.model.training
        self.model.eval()
        try:
            return policy.act(window)[0].cpu().numpy()
        finally:
            self.model.train(training)
