import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from dtlab.train import CONF_DIR

# Never the network, never a GL window: set before anything imports wandb or renders.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"


def compose_cfg(output_dir: Path, *overrides: str, config: str = "train") -> DictConfig:
    """Compose a config with the compose API, its run dir `output_dir` (as Hydra's would be)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig().set_config(cfg)
    return cfg


@pytest.fixture
def make_cfg(tmp_path: Path):
    """compose_cfg with the run dir in tmp_path."""
    return lambda *overrides, config="train": compose_cfg(tmp_path, *overrides, config=config)
