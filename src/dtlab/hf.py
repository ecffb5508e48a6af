"""transformers interop: `transformers.DecisionTransformerModel` <-> dtlab's model, exactly.

    imported = from_transformers("path/to/save_pretrained/folder")  # or an in-memory model
    policy = imported.policy()  # for dtlab.rollout; needs the normalization in dtlab.json
    module = imported.module(learning_rate=1e-4)  # a PolicyModule to fine-tune with Lightning
    to_transformers(module, "out/folder")  # DecisionTransformerModel.from_pretrained loads it

Both compute the same function, but the weights are laid out differently:
- GPT-2's Conv1D stores weights as (in, out), nn.Linear as (out, in): transposed.
- transformers adds GPT-2's position table at position id 0 to every token (the DT passes
  all-zero position ids) right after embed_ln; that is a constant, folded into embed_ln's bias
  on import and zeroed on export.
- The MLP activation is a config choice there (DecisionTransformerConfig defaults to "relu",
  GPT-2 to "gelu_new") and DTConfig.activation here: mapped, never approximated.
- transformers predicts states and returns too; dtlab predicts actions only, so those heads
  are dropped on import and left at transformers' initialisation on export.
Settings dtlab's model cannot represent (inverse-layer attention scaling, unscaled attention,
another MLP width or LayerNorm epsilon, cross-attention) are refused with an error.

State mean/std, reward scale, env id and K travel beside the weights in `dtlab.json`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dtlab import DTLabError
from dtlab.model import DecisionTransformer, DTConfig
from dtlab.policy import Policy

if TYPE_CHECKING:
    from transformers import DecisionTransformerModel

    from dtlab.module import PolicyModule

SIDECAR = "dtlab.json"
# transformers' activation_function -> DTConfig.activation; "gelu_new" and "gelu_pytorch_tanh"
# are both the tanh approximation (they agree to float rounding).
ACTIVATION_FROM_HF = {"gelu": "gelu", "relu": "relu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
ACTIVATION_TO_HF = {"gelu": "gelu", "relu": "relu", "gelu_tanh": "gelu_new"}
# transformers weights dtlab's model has no use for: the state and return heads, and GPT-2's
# token table (the DT feeds embeddings, never token ids). The position table is folded.
UNUSED_HF = ("predict_state.", "predict_return.", "encoder.wte.")


def _transformers():  # noqa: ANN202 - the transformers module, imported only when asked for
    try:
        import transformers
    except ImportError:
        raise DTLabError("transformers interop needs the transformers package: pip install 'dtlab[hf]'") from None
    return transformers


def _weight_map(n_layer: int) -> list[tuple[str, str, bool]]:
    """(dtlab name, transformers name, transposed) for every dtlab parameter."""
    pairs = [(name, name, False) for name in ("embed_timestep.weight", "embed_ln.weight", "embed_ln.bias")]
    for part in ("embed_return", "embed_state", "embed_action"):
        pairs += [(f"{part}.{p}", f"{part}.{p}", False) for p in ("weight", "bias")]
    pairs += [(f"predict_action.{p}", f"predict_action.0.{p}", False) for p in ("weight", "bias")]
    pairs += [(f"ln_f.{p}", f"encoder.ln_f.{p}", False) for p in ("weight", "bias")]
    for i in range(n_layer):
        for ln in ("ln_1", "ln_2"):
            pairs += [(f"h.{i}.{ln}.{p}", f"encoder.h.{i}.{ln}.{p}", False) for p in ("weight", "bias")]
        for conv in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            pairs += [(f"h.{i}.{conv}.weight", f"encoder.h.{i}.{conv}.weight", True)]
            pairs += [(f"h.{i}.{conv}.bias", f"encoder.h.{i}.{conv}.bias", False)]
    return pairs


def _config_from_hf(hf_config, context_length: int) -> DTConfig:  # noqa: ANN001 - a DecisionTransformerConfig
    c = hf_config
    n_embd = c.hidden_size
    width = 4 * n_embd
    dropouts = (c.resid_pdrop, c.embd_pdrop, c.attn_pdrop)
    refuse = {
        "scale_attn_by_inverse_layer_idx=True": c.scale_attn_by_inverse_layer_idx,
        "scale_attn_weights=False": not c.scale_attn_weights,
        f"n_inner={c.n_inner} (dtlab's MLP is 4 * hidden_size = {width} wide)": c.n_inner not in (None, width),
        f"layer_norm_epsilon={c.layer_norm_epsilon} (dtlab's is 1e-5)": not math.isclose(c.layer_norm_epsilon, 1e-5),
        "add_cross_attention=True": c.add_cross_attention,
        f"activation_function={c.activation_function!r} (dtlab has {sorted(ACTIVATION_FROM_HF)})": (
            c.activation_function not in ACTIVATION_FROM_HF
        ),
        # One dropout rate in dtlab: irrelevant to evaluation, but a fine-tuned import must train as configured.
        f"dropouts resid/embd/attn = {'/'.join(map(str, dropouts))} (dtlab has one rate)": len(set(dropouts)) > 1,
    }
    problems = [setting for setting, bad in refuse.items() if bad]
    if problems:
        raise DTLabError(f"this DecisionTransformerModel has settings dtlab's model does not: {'; '.join(problems)}")
    return DTConfig(
        state_dim=c.state_dim,
        act_dim=c.act_dim,
        max_ep_len=c.max_ep_len,
        context_length=context_length,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_embd=n_embd,
        dropout=float(c.resid_pdrop),
        action_tanh=c.action_tanh,
        activation=ACTIVATION_FROM_HF[c.activation_function],
    )


@dataclass
class Imported:
    """An imported model and what `dtlab.json` beside it said (None when there was none)."""

    model: DecisionTransformer
    env_id: str | None = None
    state_mean: list[float] | None = None
    state_std: list[float] | None = None
    reward_scale: float | None = None

    def policy(self, source: str = "this model") -> Policy:
        """The model with its normalization, for `dtlab.rollout.rollout`."""
        if self.state_mean is None or self.state_std is None or self.reward_scale is None:
            raise DTLabError(
                f"{source} has no {SIDECAR} with state_mean, state_std (the training data's, one entry per "
                "observation dim) and reward_scale (returns-to-go are multiplied by it; 0.001 for the HF tutorial's "
                f"scale=1000): give the data it was trained on (dataset=...), or write them into {SIDECAR} "
                "beside config.json"
            )
        return Policy(self.model, torch.tensor(self.state_mean), torch.tensor(self.state_std), self.reward_scale)

    def module(self, **hparams: Any) -> PolicyModule:
        """A PolicyModule holding these weights, to fine-tune with Lightning: the architecture
        (sizes, K, timestep table, activation, action_tanh, dropout) is the imported model's;
        `hparams` give the optimisation (learning_rate, warmup_steps, ...) and whatever
        dtlab.json did not (env_id, state_mean, state_std, reward_scale)."""
        from dtlab.module import PolicyModule  # Lightning, only when asked for

        c = self.model.config
        known = {
            "env_id": self.env_id,
            "state_mean": self.state_mean,
            "state_std": self.state_std,
            "reward_scale": self.reward_scale,
        }
        given = {k: v for k, v in known.items() if v is not None} | hparams
        missing = [k for k in known if k not in given]
        if missing:
            raise DTLabError(f"this model's {SIDECAR} does not give {missing}: pass them to module()")
        architecture = {
            "state_dim": c.state_dim,
            "act_dim": c.act_dim,
            "max_ep_len": c.max_ep_len,
            "context_length": c.context_length,
            "n_layer": c.n_layer,
            "n_head": c.n_head,
            "n_embd": c.n_embd,
            "dropout": c.dropout,
            "activation": c.activation,
            "action_tanh": c.action_tanh,
        }
        clash = sorted(set(architecture) & set(given))
        if clash:
            raise DTLabError(f"{clash} are the imported model's own and cannot be changed")
        module = PolicyModule(**architecture, **given)
        module.model.load_state_dict(self.model.state_dict())
        return module


def from_transformers(model_or_path: DecisionTransformerModel | str | Path, context_length: int = 20) -> Imported:
    """Import a `DecisionTransformerModel`, in memory or a `save_pretrained` folder (local only).

    From a folder, `dtlab.json` (if present) gives the normalization, env id and K;
    otherwise K is `context_length` (20, the paper's and the HF tutorial's), as transformers'
    config does not record it."""
    sidecar: dict = {}
    if isinstance(model_or_path, str | Path):
        path = Path(model_or_path)
        if not (path / "config.json").is_file():
            raise DTLabError(f"{str(path)!r} is not a save_pretrained folder (no config.json in it)")
        hf = _transformers().DecisionTransformerModel.from_pretrained(path, local_files_only=True)
        if (path / SIDECAR).is_file():
            sidecar = json.loads((path / SIDECAR).read_text())
    else:
        hf = model_or_path
    config = _config_from_hf(hf.config, sidecar.get("context_length", context_length))
    theirs, weight_map = hf.state_dict(), _weight_map(config.n_layer)
    weights = {ours: theirs[name].t() if transposed else theirs[name] for ours, name, transposed in weight_map}
    # transformers adds wpe[0] after embed_ln: the same as a larger embed_ln bias.
    weights["embed_ln.bias"] = weights["embed_ln.bias"] + theirs["encoder.wpe.weight"][0]
    mapped = {name for _, name, _ in weight_map} | {"encoder.wpe.weight"}
    unknown = [k for k in theirs if k not in mapped and not k.startswith(UNUSED_HF)]
    if unknown:
        raise DTLabError(f"this DecisionTransformerModel has weights dtlab does not know: {unknown[:5]}")
    model = DecisionTransformer(config)
    model.load_state_dict(weights)  # strict: every dtlab parameter was mapped
    return Imported(
        model,
        sidecar.get("env_id"),
        sidecar.get("state_mean"),
        sidecar.get("state_std"),
        sidecar.get("reward_scale"),
    )


def to_transformers(module_or_model: torch.nn.Module, out_dir: str | Path | None = None) -> DecisionTransformerModel:
    """The same policy as a `DecisionTransformerModel`, from a `PolicyModule` or a bare
    `DecisionTransformer`. With `out_dir`, also `save_pretrained` it there with `dtlab.json`
    (K, and for a PolicyModule its env id, state mean/std and reward scale). A gaussian head
    (algo=odt) converts to its mean action tanh(mu), what every evaluation acts with:
    transformers has no stochastic head, so its log std is left behind."""
    transformers = _transformers()
    model = module_or_model if isinstance(module_or_model, DecisionTransformer) else module_or_model.model
    if not isinstance(model, DecisionTransformer):
        raise DTLabError(f"only a Decision Transformer converts to transformers, not a {type(model).__name__}")
    c = model.config
    hf_config = transformers.DecisionTransformerConfig(
        state_dim=c.state_dim,
        act_dim=c.act_dim,
        hidden_size=c.n_embd,
        max_ep_len=c.max_ep_len,
        action_tanh=c.action_tanh,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_inner=4 * c.n_embd,
        activation_function=ACTIVATION_TO_HF[c.activation],
        resid_pdrop=c.dropout,
        embd_pdrop=c.dropout,
        attn_pdrop=c.dropout,
        layer_norm_epsilon=1e-5,
        bos_token_id=None,  # no token vocabulary: GPT-2's defaults would point outside it
        eos_token_id=None,
    )
    hf = transformers.DecisionTransformerModel(hf_config)
    weights = hf.state_dict()  # the state and return heads keep transformers' initialisation
    ours = model.state_dict()
    if not c.timestep_embedding:  # no table: a table of zeros adds nothing, exactly
        ours["embed_timestep.weight"] = torch.zeros_like(weights["embed_timestep.weight"])
    for name, hf_name, transposed in _weight_map(c.n_layer):
        weights[hf_name] = ours[name].t() if transposed else ours[name]
    weights["encoder.wpe.weight"] = torch.zeros_like(weights["encoder.wpe.weight"])  # folded into embed_ln.bias
    hf.load_state_dict({k: v.detach().clone() for k, v in weights.items()})
    hf.train(model.training)
    if out_dir is not None:
        out = Path(out_dir)
        hf.save_pretrained(out)
        sidecar = {"context_length": c.context_length}
        if not isinstance(module_or_model, DecisionTransformer):  # a PolicyModule: it knows its env and data
            hp = module_or_model.hparams
            sidecar |= {
                "env_id": hp.env_id,
                "state_mean": module_or_model.state_mean.tolist(),
                "state_std": module_or_model.state_std.tolist(),
                "reward_scale": float(module_or_model.reward_scale),
            }
        (out / SIDECAR).write_text(json.dumps(sidecar, indent=2))
    return hf


def transformers_actions(
    hf: DecisionTransformerModel,
    states: torch.Tensor,
    actions: torch.Tensor,
    returns_to_go: torch.Tensor,
    timesteps: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`DecisionTransformerModel`'s action predictions for inputs in dtlab's convention
    (`DecisionTransformer.forward`'s): returns-to-go (B, K) become (B, K, 1), the bool mask an
    integer attention_mask; rewards, which transformers takes but never uses, are left out."""
    attention_mask = None if mask is None else mask.long()
    out = hf(
        states=states,
        actions=actions,
        returns_to_go=returns_to_go[..., None],
        timesteps=timesteps,
        attention_mask=attention_mask,
        return_dict=True,
    )
    return out.action_preds
