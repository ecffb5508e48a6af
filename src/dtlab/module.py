"""PolicyModule: any policy network as a Lightning system (loss, optimizer, schedule, logging):
the Decision Transformer, or the behaviour-cloning MLP trained the same way (`policy`); with
`action_head="gaussian"`, the Online Decision Transformer's stochastic policy, trained by
likelihood under an entropy constraint with a learned temperature. `DTModule`, its name while
it trained the DT alone, stays an alias: checkpoints and configs written before name it
(`_target_: dtlab.module.DTModule`) and keep loading.

Everything a policy needs travels in the checkpoint (state mean/std, reward scale, K, env id
and dims), so `PolicyModule.load_from_checkpoint(path)` alone gives a working `act()`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
from torch import nn

from dtlab import DTLabError
from dtlab.data import DROPOUT, ENTROPY, stream_seed
from dtlab.model import MLPBC, POLICIES, DecisionTransformer, DTConfig, squashed_log_prob, squashed_sample
from dtlab.policy import Policy, check_timesteps, windows

# Dataset actions are clamped into [-1 + eps, 1 - eps] before the gaussian head's inverse tanh:
# an action at a bound (data recorded with clipping holds many) would be atanh(+-1) = +-inf.
# The ODT reference code's action_range epsilon.
ACTION_EPS = 1e-6


class PolicyModule(L.LightningModule):
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
        timestep_embedding: bool = True,
        init: str = "gpt2",
        return_init: str = "gpt2",
        learning_rate: float = 1e-4,
        weight_decay: float = 1e-4,
        betas: Sequence[float] = (0.9, 0.999),
        warmup_steps: int = 10_000,
        lr_schedule: str = "constant",
        compile: bool = False,
        seed: int = 0,
        policy: str = "dt",
        action_head: str = "deterministic",
        init_temperature: float = 0.1,
        temperature_lr: float = 1e-4,
        target_entropy: float | None = None,
    ) -> None:
        """Dims, env and normalization come from the env config and the data; the rest are the
        DT paper's hyperparameters (Chen et al. 2021, Table 8), its defaults, except
        `activation`: "gelu" is what every checkpoint written before this key existed used, so
        it stays the default here and they load unchanged; conf/model/small.yaml sets the
        paper's "relu".
        lr_schedule: "constant" (linear warmup, then constant, as the paper) or "cosine"
        (linear warmup, then cosine decay to 0 at trainer.max_steps).
        timestep_embedding, init, return_init: dtlab.model.DTConfig's. The defaults are those of
        every checkpoint written before these keys (a timestep table; every layer at GPT-2's
        initialisation); conf/model/small.yaml, the paper's model, sets init="reference".
        seed: the run's seed; the dropout masks of a training step are drawn from it.
        policy: the network, "dt" (DecisionTransformer) or "mlp_bc" (MLPBC, behaviour cloning:
        n_layer, n_embd, dropout and K size its MLP); both are trained the same way, by MSE on
        the dataset's actions at every real step of the window (conf/algo/).
        action_head: "deterministic" (MSE, above) or "gaussian" (the ODT paper, Zheng et al.
        2022: maximum likelihood of the dataset's actions under a tanh-squashed Gaussian,
        plus temperature x its entropy; conf/algo/odt.yaml). The temperature is learned so
        that the entropy stays above `target_entropy` (None: -act_dim, the paper's), starting
        at `init_temperature` (the reference code's 0.1), by Adam at `temperature_lr` (its
        1e-4), constant: the policy's warmup and decay are no part of it."""
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
            action_head=action_head,
            timestep_embedding=timestep_embedding,
            init=init,
            return_init=return_init,
        )
        if policy not in POLICIES:
            raise DTLabError(f"model.policy={policy!r} is unknown: use one of {sorted(POLICIES)}")
        try:
            self.model: DecisionTransformer | MLPBC = POLICIES[policy](self.config)
        except ValueError as e:  # a head the network does not have
            raise DTLabError(f"model: {e}") from None
        if action_head == "gaussian":
            # log temperature, a parameter of the system rather than of the policy: the policy
            # acts without it, and its gradient is kept out of the policy's (see the losses)
            self.log_alpha = nn.Parameter(torch.tensor(math.log(init_temperature)))
        if compile:
            self.model.compile()
        self.register_buffer("state_mean", torch.tensor(state_mean, dtype=torch.float32))
        self.register_buffer("state_std", torch.tensor(state_std, dtype=torch.float32))
        self.reward_scale = reward_scale
        # Set by dtlab.train, kept in the checkpoint for evaluation with no Hydra config at hand:
        # the env config (reference scores, paper targets), the training data's episode returns and
        # the run's target_return config (dtlab.evaluate's default targets: the run's own).
        self.env_config: dict | None = None
        self.episode_returns: list[float] | None = None
        self.target_return: dict | None = None
        # and the run's whole resolved config, which a resume is checked against (dtlab.checkpoint.resume_path)
        self.run_config: dict | None = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["dtlab"] = {
            "env": self.env_config,
            "episode_returns": self.episode_returns,
            "target_return": self.target_return,
            "config": self.run_config,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        extra = checkpoint.get("dtlab", {})
        self.env_config, self.episode_returns = extra.get("env"), extra.get("episode_returns")
        self.target_return = extra.get("target_return")  # None in checkpoints written before 2026-12-02
        self.run_config = extra.get("config")  # None in checkpoints of dtlab 0.2.0 and earlier

    def _action_mse(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """MSE between predicted and dataset actions, over the steps the policy trains on: real
        (unpadded) ones, and for MLPBC those whose K-state input is real (its trained_positions)."""
        pred = self.model(batch["states"], batch["actions"], batch["returns_to_go"], batch["timesteps"], batch["mask"])
        mask = self.model.trained_positions(batch["timesteps"], batch["mask"])
        err = ((pred - batch["actions"]) ** 2).mean(dim=-1)  # (B, K)
        return (err * mask).sum() / mask.sum()

    @property
    def target_entropy(self) -> float:
        """The entropy the temperature keeps the gaussian policy above (nats, per step)."""
        te = self.hparams.target_entropy
        return -float(self.hparams.act_dim) if te is None else float(te)

    def _likelihood_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The ODT objective over real steps. The policy maximizes log-likelihood of the
        dataset's actions plus temperature x entropy; the temperature minimizes
        temperature x (entropy - target), so it rises while the entropy is below the target
        (making entropy pay more) and falls while above. Each loss is detached where it meets
        the other's parameters, so that one backward of their sum gives each its own gradient
        (as the reference code's two optimizers do)."""
        mask = batch["mask"]
        mu, log_std = self.model.action_distribution(
            batch["states"], batch["actions"], batch["returns_to_go"], batch["timesteps"], mask
        )  # (B, K, act_dim) each
        steps = mask.sum()
        u = torch.atanh(batch["actions"].clamp(-1.0 + ACTION_EPS, 1.0 - ACTION_EPS))
        log_likelihood = (squashed_log_prob(u, mu, log_std) * mask).sum() / steps
        # entropy as the paper estimates it, -E[log pi(a)] from one reparameterized sample a
        # per step (differentiable in mu and log_std); over real steps only: a pad is no state
        noise = torch.randn(mu.shape, generator=self._entropy_noise).to(mu.device)
        _, u_sample = squashed_sample(mu, log_std, noise)
        entropy = -(squashed_log_prob(u_sample, mu, log_std) * mask).sum() / steps
        temperature = self.log_alpha.exp()
        return {
            "policy": -(log_likelihood + temperature.detach() * entropy),
            "temperature": temperature * (entropy.detach() - self.target_entropy),
            "nll": -log_likelihood.detach(),
            "entropy": entropy.detach(),
            "alpha": temperature.detach(),
        }

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
        # the gaussian head's entropy sample: a stream of its own, for the same reasons
        self._entropy_noise = torch.Generator().manual_seed(
            stream_seed(self.hparams.seed, self.global_rank, self.global_step, ENTROPY)
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.config.action_head == "gaussian":
            losses = self._likelihood_losses(batch)
            loss, total = losses["policy"], losses["policy"] + losses["temperature"]
        else:
            loss = total = self._action_mse(batch)
        # Stop before a non-finite loss reaches the weights: they, and every checkpoint, stay good.
        if not torch.isfinite(total):
            raise DTLabError(
                f"train/loss is {loss.item()} at step {self.global_step}: training stopped and the "
                "checkpoints keep the last good weights; lower model.learning_rate or check the data"
            )
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
        if self.config.action_head == "gaussian":
            self.log("train/nll", losses["nll"])
            self.log("train/entropy", losses["entropy"])
            self.log("train/temperature", losses["alpha"])
        return total

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping for the policy; with a temperature, the policy's gradient alone:
        the temperature's (|alpha (H - target)|, often above the 0.25 norm limit) inside the
        same norm would shrink every policy step. The reference code clips the model's only."""
        if self.config.action_head != "gaussian":
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        elif gradient_clip_val:
            policy = list(self.model.parameters())
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(policy, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(policy, gradient_clip_val)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # under DDP each rank validates its share of the batches: average over ranks
        self.log("val/action_mse", self._action_mse(batch), prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        groups = self.model.parameter_groups(hp.weight_decay)
        if self.config.action_head == "gaussian":
            # The temperature's own optimizer as a third group: AdamW without weight decay is
            # Adam, and Adam's update is per parameter, so this is the reference's separate
            # Adam(lr=temperature_lr) exactly, while Lightning keeps its automatic optimization
            # (one optimizer, one scheduler, clipping, checkpoints) for every algorithm.
            groups.append(
                {"name": "temperature", "params": [self.log_alpha], "weight_decay": 0.0, "lr": hp.temperature_lr}
            )
        optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, betas=tuple(hp.betas))
        warmup, total = max(hp.warmup_steps, 1), self.trainer.max_steps if self.trainer else -1

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if hp.lr_schedule == "cosine" and total > warmup:
                return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))
            return 1.0

        # Each group's schedule by its name: the temperature's rate stays constant (the reference's
        # too), every group of the policy's, however many it has, follows the policy's schedule.
        constant = {"temperature": lambda step: 1.0}
        factors = [constant.get(g.get("name"), factor) for g in groups]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
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
        policy = Policy.from_module(self)
        check_timesteps(
            int(np.max(timesteps)), policy.timestep_rows, "act: timesteps", "pass timesteps within the table"
        )
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


# The name checkpoints, configs (`_target_: dtlab.module.DTModule`) and code written before the
# rename use
DTModule = PolicyModule
