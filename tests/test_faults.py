"""The fault matrix (docs/faults.md), tried on real tiny runs: each fault gives one line and a
non-zero exit with nothing overwritten, or is survived. Killed and preempted runs, a NaN loss
and a crash mid-save are in test_resume.py; W&B unavailable in test_wandb.py."""

import contextlib
import json
import logging
import resource
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg, one_error_line, run_main
from datasets import Dataset

from dtlab import DTLabError
from dtlab.checkpoint import AtomicCheckpointIO
from dtlab.data import SAMPLE_PATH
from dtlab.train import train

SMOKE = [
    "debug=smoke",
    "logger=csv",
    "threads=1",
    "eval.backend=eager",
    "eval.workers=1",
    "callbacks.checkpoint.every_n_train_steps=10",
    "model.lr_schedule=cosine",  # the default run's schedule, which reads trainer.max_steps
    "trainer.max_steps=10",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 10-step run whose checkpoints live outside its run dir
    (paths.checkpoints_dir, as on a cluster with a scratch filesystem), and bad copies of its
    last.ckpt: NaN weights, pickled code, a zero state std (a bad import)."""
    root = tmp_path_factory.mktemp("faults")
    train(compose_cfg(root / "run", *SMOKE, f"paths.checkpoints_dir={root / 'elsewhere'}"))
    last = root / "elsewhere" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    nan = torch.load(last, map_location="cpu", weights_only=True)
    next(v for v in nan["state_dict"].values() if v.is_floating_point()).view(-1)[0] = float("nan")
    torch.save(nan, root / "nan.ckpt")
    zero_std = torch.load(last, map_location="cpu", weights_only=True)
    zero_std["state_dict"]["state_std"][0] = 0.0
    zero_std["hyper_parameters"]["state_std"][0] = 0.0
    torch.save(zero_std, root / "zero_std.ckpt")
    torch.save(saved | {"dtlab": saved["dtlab"] | {"note": Evil(root / "pwned")}}, root / "evil.ckpt")
    no_config = torch.load(last, map_location="cpu", weights_only=True)
    del no_config["dtlab"]["config"]  # as dtlab 0.2.0 wrote them
    torch.save(no_config, root / "old.ckpt")
    return root


class Evil:
    """Unpickled, it creates a file: any code could run in its place."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_one_checkpoints_key_moves_every_writer_and_reader(trained):
    ckpts = trained / "elsewhere"
    assert {p.name for p in ckpts.glob("*.ckpt")} == {"last.ckpt", "best.ckpt"}
    assert not (trained / "run" / "checkpoints").exists()
    final = json.loads((trained / "run" / "final_evaluation.json").read_text())["checkpoints"]
    assert set(final) == {"last", "best"} and final["last"]["protocol"]["checkpoint"] == str(ckpts / "last.ckpt")


def run_train(trained: Path, tmp_path: Path, monkeypatch, capsys, *overrides: str) -> tuple[int, str]:
    code, _, err = run_main("train", [*SMOKE, *overrides, f"hydra.run.dir={tmp_path / 'run'}"], monkeypatch, capsys)
    return code, err


CHANGED_RESUMES = {
    "budget": (["trainer.max_steps=15"], "trainer.max_steps=10 there, 15 here"),
    "top_fraction": (["data.top_fraction=0.5"], "data.top_fraction=1.0 there, 0.5 here"),
    "batch_size": (["data.batch_size=16"], "data.batch_size=8 there, 16 here"),
    "targets": (["target_return.values=[1000,2000]"], "target_return.values=[4074, 11476] there, [1000, 2000] here"),
    "eval_seed": (["eval.seed=5"], "eval.seed=0 there, 5 here"),
    "eval_episodes": (["eval.episodes=3"], "eval.episodes=2 there, 3 here"),
}


@pytest.mark.parametrize(("overrides", "fragment"), CHANGED_RESUMES.values(), ids=CHANGED_RESUMES.keys())
def test_a_resume_with_other_settings_is_refused(trained, tmp_path, monkeypatch, capsys, overrides, fragment):
    ckpt = trained / "elsewhere" / "last.ckpt"
    code, err = run_train(trained, tmp_path, monkeypatch, capsys, *overrides, f"ckpt_path={ckpt}")
    assert code == 2
    line = one_error_line(err)
    assert f"checkpoint '{ckpt}' was trained with other settings (" in line and fragment in line, line
    assert "start a new run instead (drop ckpt_path" in line
    assert not list((tmp_path / "run").rglob("*.ckpt"))


def test_a_resume_may_change_how_it_runs_and_old_checkpoints_resume_with_a_warning(trained, tmp_path, caplog):
    # backend, threads, logger, progress bar and the checkpoint dir are no part of the result
    how = ["eval.backend=jit", "threads=2", "logger=none", "callbacks.progress_bar.refresh_rate=1"]
    train(compose_cfg(tmp_path / "a", *SMOKE, *how, f"ckpt_path={trained / 'elsewhere' / 'last.ckpt'}"))
    assert not [r for r in caplog.records if "predates" in r.getMessage()]
    train(compose_cfg(tmp_path / "b", *SMOKE, f"ckpt_path={trained / 'old.ckpt'}"))
    assert [r for r in caplog.records if r.levelname == "WARNING" and "predates the run config" in r.getMessage()]
    assert (tmp_path / "b" / "checkpoints" / "last.ckpt").is_file()  # the new run dir is whole


def test_a_dataset_changed_on_disk_between_runs_is_refused_on_resume(trained, tmp_path, monkeypatch, capsys):
    changed = tmp_path / "episodes.parquet"  # the same data, its last episode gone
    data = Dataset.from_parquet(str(SAMPLE_PATH))
    data.select(range(len(data) - 1)).to_parquet(changed)
    ckpt = trained / "elsewhere" / "last.ckpt"
    args = ("dataset=local", f"dataset.path={changed}", f"ckpt_path={ckpt}")
    code, err = run_train(trained, tmp_path, monkeypatch, capsys, *args)
    assert code == 2
    line = one_error_line(err)
    assert f"the training data differs ({len(data)} episodes" in line and f"there, {len(data) - 1} episodes" in line


def test_a_checkpoint_writer_pointed_elsewhere_is_refused(tmp_path, monkeypatch, capsys):
    code, err = run_train(None, tmp_path, monkeypatch, capsys, f"callbacks.checkpoint.dirpath={tmp_path / 'other'}")
    assert code == 2
    line = one_error_line(err)
    assert f"callbacks.checkpoint.dirpath={tmp_path / 'other'} differs from paths.checkpoints_dir=" in line
    assert f"set paths.checkpoints_dir={tmp_path / 'other'} instead" in line
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_final_evaluation_without_last_ckpt_is_an_error(tmp_path, monkeypatch, capsys):
    code, err = run_train(None, tmp_path, monkeypatch, capsys, "callbacks.checkpoint.save_last=false")
    assert code == 2
    assert f"final evaluation: {tmp_path / 'run' / 'checkpoints' / 'last.ckpt'} does not exist" in one_error_line(err)
    assert not (tmp_path / "run" / "final_evaluation.json").exists()


@contextlib.contextmanager
def tmpfs(path: Path, size: int):
    """A real filesystem of `size` bytes at `path` (needs root, as in this project's CI)."""
    path.mkdir(parents=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.decode().strip()[:80]}): needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_stops_the_run_in_one_line_and_keeps_the_last_checkpoint(trained, tmp_path, monkeypatch, capsys):
    size = (trained / "elsewhere" / "last.ckpt").stat().st_size
    # room for the step-10 last.ckpt and best.ckpt and the logs, not for the step-20 ones
    with tmpfs(tmp_path / "disk", 2 * size + 300_000) as disk:
        run = disk / "run"
        code, _, err = run_main("train", [*SMOKE, "trainer.max_steps=20", f"hydra.run.dir={run}"], monkeypatch, capsys)
        assert code == 2
        line = one_error_line(err)
        assert f"checkpoint {run / 'checkpoints'}/" in line and "cannot be written (No space left on device)" in line
        assert f"it needs {size / 1e6:.1f} MB and {run / 'checkpoints'} has" in line
        assert f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}" in line
        last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert last["global_step"] == 10  # the previous one, whole
        assert not list(run.rglob("*.tmp"))


def test_a_write_that_fails_leaves_the_previous_checkpoint_whole(tmp_path):
    path, io = tmp_path / "last.ckpt", AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "weights": torch.ones(1000)}, path)
    before = path.read_bytes()
    # a file size limit: the kernel fails the write part-way (EFBIG), as a quota would
    limit, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, limit[1]))
        with pytest.raises(DTLabError, match=r"last.ckpt cannot be written \(File too large\): it needs 4.0 MB"):
            io.save_checkpoint({"step": 2, "weights": torch.zeros(1_000_000)}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# (command, its arguments besides ckpt_path)
READERS = {"evaluate": ("evaluate", []), "export": ("export", ["format=torchscript"]), "resume": ("train", SMOKE)}
BAD = {
    "nan_weights": ("nan.ckpt", "has non-finite weights (1 of "),
    "evil_pickle": ("evil.ckpt", "holds pickled objects that are not tensors or plain data (GLOBAL io.open)"),
}


@pytest.mark.parametrize("reader", READERS.values(), ids=READERS.keys())
@pytest.mark.parametrize(("name", "fragment"), BAD.values(), ids=BAD.keys())
def test_bad_checkpoints_are_refused_by_every_reader(trained, tmp_path, monkeypatch, capsys, reader, name, fragment):
    command, args = reader
    ckpt = trained / name
    code, _, err = run_main(command, [*args, f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path}"], monkeypatch, capsys)
    assert code == 2
    line = one_error_line(err)
    assert f"checkpoint '{ckpt}' {fragment}" in line, line
    assert not (trained / "pwned").exists()  # the pickled code never ran
    assert not list(tmp_path.rglob("*.ckpt")) and not list(trained.glob("*.pt"))


def test_a_non_finite_policy_stops_the_evaluation_without_a_score(trained, tmp_path, monkeypatch, capsys):
    ckpt = trained / "zero_std.ckpt"
    args = [f"ckpt_path={ckpt}", "eval.backend=eager", "eval.workers=1", f"hydra.run.dir={tmp_path}"]
    code, out, err = run_main("evaluate", args, monkeypatch, capsys)
    assert code == 2
    line = one_error_line(err)
    assert f"ckpt_path={ckpt}: the episode at target 4074, env seed 10000 has a non-finite action at step 0" in line
    assert "evaluation stopped, no score written" in line
    assert not (tmp_path / "evaluation.json").exists() and "nan" not in out


HOLD_LOCK = (
    "import sys, time; from dtlab import lock; lock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(99)"
)


def test_a_run_dir_in_use_is_refused_and_a_dead_runs_lock_taken_over(tmp_path, monkeypatch, capsys, caplog):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        code, _, err = run_main("train", [*SMOKE, f"hydra.run.dir={run}"], monkeypatch, capsys)
        assert code == 2
        line = one_error_line(err)
        assert f"run dir {run} is in use by pid {holder.pid} on {socket.gethostname()}, since " in line
        assert not (run / ".hydra").exists()  # refused before Hydra wrote its config there
    finally:
        holder.kill()  # SIGKILL: its lock stays behind, stale
        holder.wait()
    assert (run / ".dtlab.lock").is_file()
    logging.getLogger().addHandler(caplog.handler)  # Hydra's logging config (in run_main) took it off
    train(compose_cfg(run, *SMOKE, "trainer.max_steps=2"))
    taken = [r.getMessage() for r in caplog.records if "taking over the lock" in r.getMessage()]
    assert taken and f"pid {holder.pid}" in taken[0] and "no longer running" in taken[0]
    assert not (run / ".dtlab.lock").exists()  # released at the end


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_trainer_that_asks_for_missing_gpus_fails_in_one_line(tmp_path, monkeypatch, capsys):
    code, err = run_train(None, tmp_path, monkeypatch, capsys, "trainer=gpu")
    assert code == 2
    assert "trainer.accelerator=gpu but this machine has no CUDA device" in one_error_line(err)
