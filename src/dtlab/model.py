"""The Decision Transformer (Chen et al. 2021) as a plain nn.Module.

Each timestep t contributes three tokens, interleaved R_1, s_1, a_1, R_2, s_2, a_2, ...
(R = return-to-go). A causal GPT over the 3K tokens predicts action a_t from the hidden
state of token s_t, which has seen R_1..R_t, s_1..s_t and a_1..a_{t-1}.

With `action_head="gaussian"` (the Online Decision Transformer, Zheng et al. 2022) the head
is a tanh-squashed diagonal Gaussian: `forward` still returns one action, its mean tanh(mu),
so every caller acts with it unchanged; `action_distribution` gives (mu, log_std) for the
likelihood and for sampled exploration (`squashed_log_prob`, `squashed_sample`).

MLPBC, the behaviour-cloning baseline, takes the same inputs and config. Usable without
Lightning or Hydra:

    model = DecisionTransformer(DTConfig(state_dim=17, act_dim=6))
    actions = model(states, actions, returns_to_go, timesteps, mask)  # (B, K, act_dim)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DTConfig:
    state_dim: int  # observation size of the env
    act_dim: int  # action size of the env; actions are assumed to lie in [-1, 1]
    max_ep_len: int = 1000  # rows of the timestep embedding table: the env's episode limit
    context_length: int = 20  # K: timesteps per window, so 3K tokens
    n_layer: int = 3
    n_head: int = 1
    n_embd: int = 128
    dropout: float = 0.1  # on embeddings, attention weights, residual branches
    action_tanh: bool = True  # squash predicted actions into [-1, 1]
    # MLP nonlinearity: "gelu" (exact, erf), "gelu_tanh" (GPT-2's tanh approximation) or "relu"
    # (the DT reference code's activation_function='relu', and DecisionTransformerConfig's
    # default; conf/model/small.yaml). "gelu" stays the default: checkpoints written before
    # the choice existed were trained with it. See dtlab.hf.
    activation: str = "gelu"
    # "deterministic": one action per step (the DT paper's, trained by MSE); "gaussian": a
    # tanh-squashed diagonal Gaussian (the ODT paper's, trained by likelihood), whose mean
    # tanh(mu) forward() returns; it always squashes, so it needs action_tanh.
    action_head: str = "deterministic"
    # The paper's timestep embedding: a learned table of max_ep_len rows added to every token.
    # False: none. On a few dozen episodes the table lets the model fit each training episode's
    # actions by their time instead of by their states (docs/notes.md#return-conditioning).
    timestep_embedding: bool = True
    # The initialisation. "reference": the DT reference code's (kzl/decision-transformer): its
    # GPT-2 blocks at GPT-2's rule (weights N(0, 0.02), biases 0, LayerNorms 1 and 0, no scaling
    # of the residual projections), while the embeddings and the action head, created outside
    # its GPT2Model, keep PyTorch's defaults (nn.Embedding N(0, 1); nn.Linear weights and biases
    # U(-1/sqrt(fan_in), 1/sqrt(fan_in))). "gpt2": transformers' DecisionTransformerModel's,
    # every layer at GPT-2's rule and the residual projections at 0.02 / sqrt(2 n_layer). With
    # "gpt2" the return token LayerNorm(w R + b + e_t) starts nearly the same vector for every
    # R > 0 (b = 0, w and e_t small), so the model starts blind to its return
    # (docs/notes.md#return-conditioning).
    init: str = "gpt2"
    # Before `init` existed: "torch" put the return embedding alone at PyTorch's default on top
    # of "gpt2" (the first run's recipe then). Kept so that such checkpoints and configs load
    # and build unchanged; with init="reference" it changes nothing.
    return_init: str = "gpt2"


ACTION_HEADS = ("deterministic", "gaussian")
INITS = ("reference", "gpt2")
RETURN_INITS = ("gpt2", "torch")
# log std of the gaussian head, squashed into this range (the ODT reference code's, from
# pytorch_sac): std from e^-5 = 0.007 (near-deterministic) to e^2 = 7.4 (near-uniform after tanh)
LOG_STD_BOUNDS = (-5.0, 2.0)


def squashed_log_prob(u: torch.Tensor, mu: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log pi(a) of a = tanh(u) under the tanh-squashed diagonal Gaussian N(mu, exp(log_std)^2),
    summed over the last (action) dim: sum_i log N(u_i) - log(1 - tanh(u_i)^2), in closed form.
    log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)) holds for every u and is finite where
    1 - tanh(u)^2 rounds to 0 (|u| > ~9 in float32). Takes the pre-tanh u, not a: from a
    sample, u is at hand exactly; for a dataset action, u = atanh(a) of an action clamped
    inside (-1, 1) by the caller (dtlab.module)."""
    z = (u - mu) * torch.exp(-log_std)
    log_normal = -0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)
    log_det = 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))
    return (log_normal - log_det).sum(dim=-1)


def squashed_sample(mu: torch.Tensor, log_std: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A draw from the squashed Gaussian given standard normal `noise` (shaped like mu), by
    reparameterization (gradients flow to mu and log_std): (a, u) with a = tanh(u)."""
    u = mu + torch.exp(log_std) * noise
    return torch.tanh(u), u


ACTIVATIONS = {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "relu": nn.ReLU}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: DTConfig) -> None:
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise ValueError(f"n_embd={config.n_embd} must be divisible by n_head={config.n_head}")
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, last_only: bool = False) -> torch.Tensor:
        """x: (B, T, C). attn_mask: (B, 1, T, T) bool, True = may attend, or None for plain
        causal. last_only: output the last token only, (B, 1, C); keys and values still cover
        all T tokens. Used at inference, where only the last state token matters."""
        B, T, C = x.shape
        if last_only:  # project the one query needed: saves a third of this projection
            q = F.linear(x[:, -1:], self.c_attn.weight[:C], self.c_attn.bias[:C])
            k, v = F.linear(x, self.c_attn.weight[C:], self.c_attn.bias[C:]).split(C, dim=2)
        else:
            q, k, v = self.c_attn(x).split(C, dim=2)
        Tq = q.shape[1]
        q = q.view(B, Tq, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, Tq, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        dropout_p = self.attn_dropout if self.training else 0.0
        if attn_mask is None:
            # causal; the last token sees every token, so alone it needs no mask at all
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=not last_only)
        else:
            attn_mask = attn_mask[:, :, -1:] if last_only else attn_mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, Tq, C)  # (B, Tq, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: DTConfig) -> None:
        super().__init__()
        if config.activation not in ACTIVATIONS:
            raise ValueError(f"activation={config.activation!r} is unknown: use one of {sorted(ACTIVATIONS)}")
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.act = ACTIVATIONS[config.activation]()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block, as in GPT-2."""

    def __init__(self, config: DTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, last_only: bool = False) -> torch.Tensor:
        residual = x[:, -1:] if last_only else x
        x = residual + self.attn(self.ln_1(x), attn_mask, last_only)
        return x + self.mlp(self.ln_2(x))


def _causal(T: int, device: torch.device) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


class DecisionTransformer(nn.Module):
    def __init__(self, config: DTConfig) -> None:
        super().__init__()
        self.config = config
        C = config.n_embd
        self.embed_timestep = nn.Embedding(config.max_ep_len, C) if config.timestep_embedding else None
        self.embed_return = nn.Linear(1, C)
        self.embed_state = nn.Linear(config.state_dim, C)
        self.embed_action = nn.Linear(config.act_dim, C)
        self.embed_ln = nn.LayerNorm(C)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(C)
        if config.action_head not in ACTION_HEADS:
            raise ValueError(f"action_head={config.action_head!r} is unknown: use one of {ACTION_HEADS}")
        if config.return_init not in RETURN_INITS:
            raise ValueError(f"return_init={config.return_init!r} is unknown: use one of {RETURN_INITS}")
        if config.action_head == "gaussian" and not config.action_tanh:
            raise ValueError("action_head='gaussian' is tanh-squashed: it needs action_tanh=True")
        self.predict_action = nn.Linear(C, config.act_dim)  # the action; the gaussian's mu
        if config.action_head == "gaussian":
            self.predict_log_std = nn.Linear(C, config.act_dim)
        if config.init not in INITS:
            raise ValueError(f"init={config.init!r} is unknown: use one of {INITS}")
        self._init(config)

    def _init(self, config: DTConfig) -> None:
        """Initialise the parameters by `config.init` (see DTConfig): GPT-2's rule on every layer
        ("gpt2"), or on the transformer blocks only ("reference")."""
        if config.init == "reference":
            # the embeddings, embed_ln and heads were just built with PyTorch's defaults
            self.h.apply(self._init_weights)
            return
        self.apply(self._init_weights)
        # GPT-2: scale residual projections by 1/sqrt(2 * n_layer) so depth keeps the variance
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.return_init == "torch":
            self.embed_return.reset_parameters()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        states: torch.Tensor,
        actions: torch.Tensor,
        returns_to_go: torch.Tensor,
        timesteps: torch.Tensor,
        mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Predict actions from a window of K timesteps.

        states (B, K, state_dim), actions (B, K, act_dim), returns_to_go (B, K), all already
        normalized/scaled; timesteps (B, K) long; mask (B, K) bool, True at real steps (windows
        are left-padded), None when nothing is padded. Inputs at padded steps are ignored,
        whatever their values.

        Returns (B, K, act_dim), the action predicted at every step; with last_only=True,
        (B, act_dim) for the last step only, skipping work no other output needs. The gaussian
        head returns its mean action tanh(mu).
        """
        return self._head(self._hidden(states, actions, returns_to_go, timesteps, mask, last_only))

    def action_distribution(
        self,
        states: torch.Tensor,
        actions: torch.Tensor,
        returns_to_go: torch.Tensor,
        timesteps: torch.Tensor,
        mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The gaussian head's (mu, log_std), each shaped as forward()'s output, from the same
        inputs: the pre-tanh Gaussian of the squashed action distribution."""
        if self.config.action_head != "gaussian":
            raise ValueError("action_distribution needs action_head='gaussian'; this model is deterministic")
        h = self._hidden(states, actions, returns_to_go, timesteps, mask, last_only)
        low, high = LOG_STD_BOUNDS
        log_std = low + 0.5 * (high - low) * (torch.tanh(self.predict_log_std(h)) + 1.0)
        return self.predict_action(h), log_std

    def _hidden(
        self,
        states: torch.Tensor,
        actions: torch.Tensor,
        returns_to_go: torch.Tensor,
        timesteps: torch.Tensor,
        mask: torch.Tensor | None,
        last_only: bool,
    ) -> torch.Tensor:
        """The final hidden states of the state tokens s_1..s_K, (B, K, C), or of s_K alone,
        (B, C), with last_only: what the heads read."""
        B, K, _ = states.shape
        if mask is not None:
            # Zero padded inputs so that no pad value (even inf or NaN) can reach real tokens
            # through 0 * inf in the attention's weighted sum.
            states = states.masked_fill(~mask[..., None], 0.0)
            actions = actions.masked_fill(~mask[..., None], 0.0)
            returns_to_go = returns_to_go.masked_fill(~mask, 0.0)
            timesteps = timesteps.masked_fill(~mask, 0)
        time = 0.0 if self.embed_timestep is None else self.embed_timestep(timesteps)  # (B, K, C)
        r = self.embed_return(returns_to_go[..., None]) + time  # (B, K, C)
        s = self.embed_state(states) + time  # (B, K, C)
        a = self.embed_action(actions) + time  # (B, K, C)
        # R1 s1 a1 R2 s2 a2 ... R_K s_K: a_K is dropped, as no prediction can see it (causal).
        T = 3 * K - 1
        x = torch.stack((r, s, a), dim=2).reshape(B, 3 * K, -1)[:, :T]  # (B, T, C)
        x = self.drop(self.embed_ln(x))

        attn_mask = None
        if mask is not None:
            keys = mask.repeat_interleave(3, dim=1)[:, :T]  # (B, T): the mask of every token
            attn_mask = _causal(T, x.device)[None] & keys[:, None, :]  # (B, T, T)
            # A padded token may attend to itself: its row is never all-False, so no NaN.
            # (The diagonal as a comparison, not torch.eye: ONNX Runtime has no boolean EyeLike.)
            i = torch.arange(T, device=x.device)
            attn_mask = attn_mask | (i[:, None] == i[None, :])
            attn_mask = attn_mask[:, None]  # (B, 1, T, T), broadcast over heads

        for i, block in enumerate(self.h):
            # In the last block only the last token, s_K, feeds the returned action.
            x = block(x, attn_mask, last_only=last_only and i == len(self.h) - 1)  # (B, T or 1, C)
        x = self.ln_f(x)
        if last_only:
            return x[:, -1]  # (B, C)
        return x[:, 1::3]  # hidden states of s_1..s_K: (B, K, C)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        out = self.predict_action(h)
        return torch.tanh(out) if self.config.action_tanh else out

    def trained_positions(self, timesteps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, K) bool: the window positions the loss reads. Every real step: the DT paper
        trains each position on the history the window holds, as it acts early in an episode."""
        return mask

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        return parameter_groups(self, weight_decay)


class MLPBC(nn.Module):
    """Behaviour cloning as the DT reference code's MLPBCModel (kzl/decision-transformer): an
    MLP over the last K normalized states, n_layer Linear layers of n_embd units, ReLU and
    dropout between them, tanh on the action. It reads no returns-to-go and no past actions,
    so its return-conditioning curve is flat by construction.

    Called like DecisionTransformer. For (B, K, act_dim) outputs, the action at window
    position k is predicted from states k-K+1 .. k of the window, zeros before its start; at
    acting time (last_only) that is exactly the last K states, zeros only before the
    episode's first step. So training reads only the positions whose input is the same kind
    (`trained_positions`): the reference code trains the last position alone."""

    def __init__(self, config: DTConfig) -> None:
        super().__init__()
        if config.action_head != "deterministic":
            raise ValueError(f"MLPBC has a deterministic head only, not action_head={config.action_head!r}")
        self.config = config
        K, H = config.context_length, config.n_embd
        layers: list[nn.Module] = [nn.Linear(K * config.state_dim, H)]
        for _ in range(config.n_layer - 1):
            layers += [nn.ReLU(), nn.Dropout(config.dropout), nn.Linear(H, H)]
        layers += [nn.ReLU(), nn.Dropout(config.dropout), nn.Linear(H, config.act_dim)]
        self.mlp = nn.Sequential(*layers)

    def forward(
        self,
        states: torch.Tensor,
        actions: torch.Tensor,
        returns_to_go: torch.Tensor,
        timesteps: torch.Tensor,
        mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Inputs as DecisionTransformer.forward; actions, returns_to_go and timesteps are
        ignored. Returns (B, K, act_dim), or (B, act_dim) with last_only."""
        B, T, S = states.shape
        K = self.config.context_length
        if mask is not None:
            states = states.masked_fill(~mask[..., None], 0.0)
        padded = F.pad(states, (0, 0, K - 1, 0))  # (B, K-1+T, S): zeros before the window
        if last_only:
            x = padded[:, -K:].reshape(B, K * S)  # (B, K*S): the last K states
            return self._head(self.mlp(x))  # (B, act_dim)
        x = padded.unfold(1, K, 1)  # (B, T, S, K): the K states up to each position
        x = x.permute(0, 1, 3, 2).reshape(B, T, K * S)  # (B, T, K*S), oldest state first
        return self._head(self.mlp(x))  # (B, T, act_dim)

    def _head(self, out: torch.Tensor) -> torch.Tensor:
        return torch.tanh(out) if self.config.action_tanh else out

    def trained_positions(self, timesteps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: the real positions whose K-state input is the episode's own: K states
        inside the window, or a window from the episode's first step, where the zeros before
        it stand for what the rollout feeds early in an episode. Elsewhere the zeros would
        stand in for real states the window cut off, an input the policy never meets when it
        acts (with K=5, four of five positions of a window that starts mid-episode)."""
        K = self.config.context_length
        real_so_far = mask.cumsum(dim=1)  # (B, T): real steps up to and including each position
        first = torch.where(mask, timesteps, torch.iinfo(timesteps.dtype).max).amin(dim=1)  # (B,) first real step
        return mask & ((real_so_far >= K) | (first == 0)[:, None])

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        return parameter_groups(self, weight_decay)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups, minGPT's split: weight decay on Linear weight matrices; none on
    biases, LayerNorm parameters and the timestep embedding table. (The DT reference code,
    kzl/decision-transformer, decays every parameter alike; with its 1e-4 the difference is
    small, but it is a difference.)"""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, nn.Linear) and name == "weight":
                decay.append(p)
            else:
                no_decay.append(p)
    # named, so that PolicyModule gives each group its schedule by what it holds
    return [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]


# The policy networks PolicyModule can train (its `policy` argument); the rollout calls any of them.
POLICIES = {"dt": DecisionTransformer, "mlp_bc": MLPBC}
