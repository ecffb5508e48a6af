"""Checkpoints written before issue 34's renames (DTModule, dtlab.callbacks.OnlineFinetuning)
load as the module they were."""

from pathlib import Path

import torch
from hydra.utils import get_object

from dtlab.checkpoint import load_checkpoint
from dtlab.module import DTModule, PolicyModule

OLD = Path(__file__).parent / "fixtures" / "dtlab-0.2.0-odt-pretrained.ckpt"  # an ODT run's pretrained.ckpt


def test_a_checkpoint_written_before_the_renames_loads_as_a_policy_module():
    module = load_checkpoint(OLD)
    assert isinstance(module, PolicyModule) and DTModule is PolicyModule
    assert isinstance(DTModule.load_from_checkpoint(OLD, map_location="cpu"), PolicyModule)
    config = torch.load(OLD, map_location="cpu", weights_only=False)["dtlab"]["config"]
    assert (
        config["model"]["_target_"] == "dtlab.module.DTModule"
        and get_object(config["model"]["_target_"]) is PolicyModule
    )
    assert get_object(config["online"]["_target_"]) is get_object("dtlab.online.OnlineFinetuning")
