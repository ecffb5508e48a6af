"""The GPU path, for the day a CUDA machine runs the suite (skipped elsewhere, with the reason in
the summary): `debug=smoke trainer=gpu` for each algorithm and in bf16-mixed, each run's final
evaluation repeated by dtlab.evaluate on its last.ckpt. On CUDA these exercise what no CPU test
can: CPU-drawn noise moved with .to(device), map_location, the squashed Gaussian under
autocast, rollouts on device."""

import json

import pytest
import torch
from conftest import compose_cfg

from dtlab.evaluate import evaluate
from dtlab.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")

RUNS = {
    "dt": ["algo=dt"],
    "bc": ["algo=bc"],
    "odt": ["algo=odt", "online.rounds=2", "online.updates_per_round=5"],
    "dt_bf16": ["algo=dt", "trainer.precision=bf16-mixed"],
}


@pytest.mark.parametrize("overrides", RUNS.values(), ids=RUNS.keys())
def test_a_gpu_run_trains_evaluates_and_its_final_evaluation_repeats(tmp_path, overrides):
    run = tmp_path / "run"
    train(compose_cfg(run, "debug=smoke", "trainer=gpu", "logger=csv", "eval.backend=eager", *overrides))
    final = json.loads((run / "final_evaluation.json").read_text())["checkpoints"]["last"]
    assert final["protocol"]["step"] == torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    report = evaluate(
        compose_cfg(
            tmp_path / "eval", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "eval.backend=eager", config="evaluate"
        )
    )
    # the same protocol: seeds, episodes, targets, step
    for key in ("seeds", "episodes_per_target", "targets", "step"):
        assert report["protocol"][key] == final["protocol"][key], key
    # dtlab.evaluate acts on the CPU, the final evaluation on the GPU: close, not bit-equal
    for a, b in zip(report["summary"], final["summary"], strict=True):
        assert all(map(torch.isfinite, torch.tensor([a["return_mean"], b["return_mean"]])))
        assert a["return_mean"] == pytest.approx(b["return_mean"], rel=0.05, abs=5.0)
