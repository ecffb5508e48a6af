"""The private internals of Lightning and W&B that dtlab relies on (pyproject bounds both): an
upgrade that renames one fails here with a message, not in a resumed run's wrong result."""

import importlib.metadata

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

# what dtlab.checkpoint calls or sets on ModelCheckpoint, and why
CHECKPOINT_INTERNALS = {
    "_save_last_checkpoint": "Checkpoint saves last.ckpt on SIGTERM and at the end",
    "_save_topk_checkpoint": "BestCheckpoint saves on the evaluation's schedule",
    "_monitor_candidates": "both pass the monitored metrics to the savers",
    "_should_skip_saving_checkpoint": "BestCheckpoint skips where Lightning would",
    "_last_global_step_saved": "Checkpoint saves last.ckpt once per step",
    "best_k_models": "BestCheckpoint carries best.ckpt into a new run dir",
}


@pytest.mark.parametrize("name", CHECKPOINT_INTERNALS)
def test_lightning_model_checkpoint_still_has_what_dtlab_uses(name):
    callback = ModelCheckpoint()
    assert hasattr(callback, name), (
        f"lightning {importlib.metadata.version('lightning')} has no ModelCheckpoint.{name}, which dtlab.checkpoint "
        f"uses ({CHECKPOINT_INTERNALS[name]}): pin lightning below this release or port dtlab.checkpoint"
    )


def test_wandb_offline_run_records_still_parse():
    try:
        from wandb.proto.wandb_internal_pb2 import Record
    except ImportError as e:
        pytest.fail(
            f"wandb {importlib.metadata.version('wandb')} moved wandb.proto.wandb_internal_pb2 ({e}): "
            "dtlab.tracking.read_offline_run reads offline runs with it; pin wandb or port the reader"
        )
    fields = {f.name for f in Record.DESCRIPTOR.fields}
    used = {"run", "config", "history", "summary", "artifact"}  # what read_offline_run reads
    assert used <= fields, (
        f"wandb {importlib.metadata.version('wandb')}'s Record lacks {sorted(used - fields)}, which "
        "dtlab.tracking.read_offline_run reads: pin wandb or port the reader"
    )
