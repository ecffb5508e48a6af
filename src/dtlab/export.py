"""Export a checkpoint's policy to run without dtlab:
`python -m dtlab.export ckpt_path=PATH [format=onnx|torchscript] [out=PATH]` (conf/export.yaml).

The file maps a K-step window to the next action, with the state normalization and reward scale
baked in. Inputs: `observations` [B, K, obs_dim] float32 (raw), `actions` [B, K, act_dim]
float32, `returns_to_go` [B, K] float32 (raw return units), `timesteps` [B, K] int64, `mask`
[B, K] bool (True at real steps; windows left-padded); B any; output `action` [B, act_dim].
The metadata (env id, dims, K, reward scale, timestep table, the training data's returns,
dtlab version) goes beside it as `<out>.json`. See docs/export.md for running it with
onnxruntime alone.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from dtlab import DTLabError
from dtlab.cli import CONF_DIR, find_checkpoint, run_cli
from dtlab.inference import INPUTS, export_policy
from dtlab.policy import Policy
from dtlab.protocol import version

SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}


def export(cfg: DictConfig) -> Path:
    if OmegaConf.is_missing(cfg, "ckpt_path") or cfg.ckpt_path is None:
        raise DTLabError("give ckpt_path=PATH: the dtlab checkpoint to export")
    if cfg.format not in SUFFIX:
        raise DTLabError(f"format={cfg.format!r} is unknown: use onnx or torchscript")
    ckpt = Path(find_checkpoint(cfg.ckpt_path))
    if cfg.format == "onnx":
        try:
            import onnx  # noqa: F401 - torch's exporter writes through it
        except ImportError:
            raise DTLabError("format=onnx needs onnx: pip install 'dtlab[onnx]'") from None
    from dtlab.checkpoint import load_checkpoint  # Lightning: after the checks

    module = load_checkpoint(ckpt)
    hp = module.hparams
    out = Path(cfg.out) if cfg.out else ckpt.parent / f"policy{SUFFIX[cfg.format]}"
    returns = module.episode_returns or []
    metadata = {
        "format": cfg.format,
        "inputs": list(INPUTS),
        "output": "action",
        "env_id": hp.env_id,
        "obs_dim": hp.state_dim,
        "act_dim": hp.act_dim,
        "context_length": hp.context_length,
        "max_ep_len": hp.max_ep_len,
        "timestep_embedding": hp.get("timestep_embedding", True),
        "reward_scale": float(module.reward_scale),
        "policy": hp.get("policy", "dt"),
        "data_returns": {"min": min(returns), "max": max(returns)} if returns else None,
        "checkpoint": str(ckpt.resolve()),
        "dtlab": version("dtlab"),
        "torch": torch.__version__,
    }
    export_policy(Policy.from_module(module), cfg.format, out, metadata)
    print(f"wrote {out} and {out}.json")
    return out


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    run_cli(export, cfg)


if __name__ == "__main__":
    main()
