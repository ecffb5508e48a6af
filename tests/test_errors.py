"""Every bad input stops `dtlab.train` / `dtlab.evaluate` before any training step, with one
line that names the problem and the fix, a non-zero exit and no traceback.

The commands run in this process through their real `main()` (Hydra's argument parsing, our
Hydra callback, `run_cli`): starting a fresh interpreter costs ~6 s of CPU here (Lightning
imports torchmetrics, which imports transformers), and test_train.py already shows the same
one line and exit code from a real subprocess."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_cfg, run_main
from datasets import Dataset, Features, Sequence, Value

from dtlab.train import train

T = 30  # steps per episode


def episodes(obs_dim: int = 17, act_dim: int = 6, n: int = 2) -> dict[str, list]:
    rng = np.random.default_rng(0)
    return {
        "observations": [rng.normal(size=(T, obs_dim)).astype(np.float32) for _ in range(n)],
        "actions": [rng.uniform(-1, 1, size=(T, act_dim)).astype(np.float32) for _ in range(n)],
        "rewards": [rng.normal(size=T).astype(np.float32) for _ in range(n)],
    }


def with_value(column: str, episode: int, index: int | tuple[int, int], value: float) -> dict[str, list]:
    """Episodes with `value` at `index` (a step, or a step and a dimension) of one episode."""
    data = episodes()
    data[column][episode][index] = value
    return data


BAD_DATA = {
    "missing_column": {k: v for k, v in episodes().items() if k != "actions"},
    "ragged_episode": episodes() | {"actions": [a[:-1] for a in episodes()["actions"]]},
    "action_size": episodes(act_dim=3),
    "action_out_of_bounds": with_value("actions", 1, (7, 2), -3.0),
    "nan_observation": with_value("observations", 0, 4, np.nan),
    "inf_action": with_value("actions", 1, 2, np.inf),
    "nan_reward": with_value("rewards", 0, T - 1, np.nan),
    "empty": {"observations": [], "actions": [], "rewards": []},
    "zero_length_episode": {k: [v[0], v[0][:0], v[1]] for k, v in episodes().items()},
    "long_episode": {k: [v[0], np.concatenate([v[0], v[1][:11]])] for k, v in episodes().items()},
}
FEATURES = Features(
    {
        "observations": Sequence(Sequence(Value("float32"))),
        "actions": Sequence(Sequence(Value("float32"))),
        "rewards": Sequence(Value("float32")),
    }
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """The bad datasets as Parquet files, a file that is not Parquet, a file that is not a
    directory, a good checkpoint and a truncated copy of it."""
    root = tmp_path_factory.mktemp("inputs")
    for name, data in BAD_DATA.items():
        Dataset.from_dict(data, features=FEATURES if name == "empty" else None).to_parquet(root / f"{name}.parquet")
    (root / "notes.csv").write_text("observations,actions,rewards\n")
    (root / "a_file").write_text("")
    train(compose_cfg(root / "trained", "debug=smoke", "threads=1", "trainer.max_steps=2"))
    good = root / "trained" / "checkpoints" / "last.ckpt"
    (root / "truncated.ckpt").write_bytes(good.read_bytes()[:5000])
    return root


def data(name: str) -> list[str]:
    return ["dataset=local", f"dataset.path={{inputs}}/{name}.parquet"]


CKPT = "{inputs}/trained/checkpoints/last.ckpt"
# (command, arguments, exit code, fragments of the one line: the problem ... the fix)
CASES = {
    "missing_path": ("train", ["dataset=local", "dataset.path={inputs}/nope/*.parquet"], 2, "matches no file: give"),
    "not_parquet": (
        "train",
        ["dataset=local", "dataset.path={inputs}/notes.csv"],
        2,
        "notes.csv' is not a Parquet file (... convert it or fix the path",
    ),
    "missing_column": ("train", data("missing_column"), 2, "lacks column(s) ['actions'] ... it needs one row per"),
    "ragged_episode": ("train", data("ragged_episode"), 2, "episode 0 has 30 observations but 29 actions: every"),
    "action_size": ("train", data("action_size"), 2, "action size 3, but the env expects 17 and 6: choose the env"),
    "action_out_of_bounds": (
        "train",
        data("action_out_of_bounds"),
        2,
        "action -3 at episode 1, step 7, dimension 2 lies outside the env's bounds [-1, 1]: rescale or clip",
    ),
    "nan_observation": ("train", data("nan_observation"), 2, "observations hold NaN or Inf at episode 0, step 4"),
    "inf_action": ("train", data("inf_action"), 2, "actions hold NaN or Inf at episode 1, step 2: clean"),
    "nan_reward": ("train", data("nan_reward"), 2, f"rewards hold NaN or Inf at episode 0, step {T - 1}: clean"),
    "empty_dataset": ("train", data("empty"), 2, "dataset has no episodes: check dataset.path"),
    "context_longer_than_episodes": (
        "train",
        ["model.context_length=1001"],
        2,
        "context length K=1001 exceeds the env's episode limit env.max_ep_len=1000: set model.context_length <= 1000",
    ),
    "zero_length_episode": ("train", data("zero_length_episode"), 2, "episode 1 has no steps (1 of 3 episodes are"),
    "episode_longer_than_the_table": (
        "train",
        [*data("long_episode"), "env.max_ep_len=40"],
        2,
        "episode 1 has 41 steps, more than the model's timestep table of env.max_ep_len=40 rows: set env.max_ep_len",
    ),
    "horizon_longer_than_the_table": (
        "train",
        ["env.max_episode_steps=1200"],
        2,
        "env.max_episode_steps=1200 reaches timestep 1199, but the model's timestep table has 1000 rows",
    ),
    "unknown_env": ("train", ["env.id=Nope-v0"], 2, "unknown env id 'Nope-v0' (... choose env=halfcheetah"),
    "no_target_returns": ("train", ["target_return.values=[]"], 2, "no target returns given: set target_return"),
    "non_numeric_target": (
        "train",
        ["target_return=custom", "target_return.values=[6000,high]"],
        2,
        "config: target_return.values.1='high' is not allowed: it must be a valid number",
    ),
    "output_dir_not_writable": (
        "train",
        ["hydra.run.dir={inputs}/a_file/run"],
        2,
        "output dir '{inputs}/a_file/run' cannot be written (Not a directory): choose another with hydra.run.dir",
    ),
    "resume_missing_checkpoint": ("train", ["ckpt_path={inputs}/nope.ckpt"], 2, "does not exist: give ckpt_path=PATH"),
    "resume_last_without_checkpoint": (
        "train",
        ["ckpt_path=last"],
        2,
        "ckpt_path=last looks for {run}/checkpoints/last.ckpt, which does not exist: resume a run with hydra.run.dir",
    ),
    "resume_corrupt_checkpoint": ("train", ["ckpt_path={inputs}/truncated.ckpt"], 2, "cannot be loaded (... is it a"),
    "resume_with_other_settings": (
        "train",
        [f"ckpt_path={CKPT}", "model.n_embd=16"],
        2,
        "was trained with other settings (n_embd=32 there, 16 here): resume with the config it was trained with",
    ),
    "unknown_config_option": ("train", ["model=huge"], 1, "Could not find 'model/huge'"),
    # config values, checked against dtlab.config's schema before anything else
    "zero_episodes": ("train", ["eval.episodes=0"], 2, "config: eval.episodes=0 is not allowed: it must be greater"),
    "zero_batch": ("train", ["data.batch_size=0"], 2, "config: data.batch_size=0 is not allowed: it must be"),
    "negative_lr": (
        "train",
        ["model.learning_rate=-1"],
        2,
        "model.learning_rate=-1 is not allowed: it must be greater",
    ),
    "heads_do_not_divide": (
        "train",
        ["model.n_embd=100", "model.n_head=3"],
        2,
        "config: model.n_embd=100 is not divisible by model.n_head=3",
    ),
    "seed_not_a_number": ("train", ["seed=abc"], 2, "config: seed='abc' is not allowed: it must be a valid integer"),
    "val_fraction_above_one": ("train", ["data.val_fraction=1.5"], 2, "data.val_fraction=1.5 is not allowed: it must"),
    "zero_steps": ("train", ["trainer.max_steps=0"], 2, "config: trainer.max_steps=0 is not allowed: it must be"),
    "zero_threads": ("train", ["threads=0"], 2, "config: threads=0 is not allowed"),
    "workers_not_a_number": (
        "train",
        ["eval.workers=many"],
        2,
        "config: eval.workers='many' is not allowed: it must be a valid integer, unable to parse string as an integer"
        " or 'auto'",
    ),
    "unknown_activation": ("train", ["model.activation=tanh"], 2, "'tanh' is not allowed: it must be 'relu', 'gelu'"),
    "misspelled_model_key": ("train", ["+model.n_embed=64"], 2, "model.n_embed is not a key of model (it has ..."),
    "misspelled_dataset_key": (
        "train",
        ["dataset=local", "dataset.path=x.parquet", "+dataset.pth=x.parquet"],
        2,
        "dataset.pth is not an argument of dtlab.data.load_local (it takes path)",
    ),
    "a_path_for_the_sample": (
        "train",
        ["+dataset.path=x.parquet"],
        2,
        "dataset.path is not an argument of dtlab.data.load_sample (it takes none): ... dataset=local dataset.path",
    ),
    # a dataset config's missing key is an error before anything loads, never the embedded sample
    "local_without_path": ("train", ["dataset=local"], 2, "config: dataset.path is missing: set it with dataset.path="),
    "mixture_source_without_path": (
        "train",
        ["dataset=mixture", "dataset.sources.medium.path={inputs}/empty.parquet"],
        2,
        "config: dataset.sources.expert.path is missing: set it with dataset.sources.expert.path=FILE",
    ),
    "d4rl_hdf5_without_path": ("train", ["dataset=d4rl_hdf5"], 2, "config: dataset.path is missing: set it with"),
    "local_path_null": (
        "train",
        ["dataset=local", "dataset.path=null"],
        2,
        "config: dataset.path=null: set it with dataset.path=FILE (the embedded sample is dataset=sample",
    ),
    "evaluate_hf_model_local_without_path": (
        "evaluate",
        ["hf_model={inputs}/hf", "dataset=local"],
        2,
        "config: dataset.path is missing: set it with dataset.path=FILE",
    ),
    "seed_ranges_overlap_with_sweep_targets": (
        "train",
        ["target_return=sweep", "eval.seed=10010"],
        2,
        "eval.seed=10010 gives in-training env seeds 10010-10013, which overlap the reporting seeds 10000-10019 "
        "(eval.report_seed=10000)",
    ),
    "preset_without_its_data_dir": (
        "train",
        ["experiment=hopper-mixed"],
        2,
        "config: data_dir is missing: give data_dir=PATH, the folder of the datasets' Parquet files",
    ),
    "development_seeds_overlap_reporting": (
        "train",
        ["eval.dev_seed=10002"],
        2,
        "eval.report_seed=10000 gives reporting env seeds 10000-10003, which overlap the development seeds "
        "10002-10005 (eval.dev_seed=10002): keep the ranges apart",
    ),
    "development_seeds_overlap_selection": (
        "train",
        ["eval.dev_seed=3"],
        2,
        "eval.seed=0 gives in-training env seeds 0-3, which overlap the development seeds 3-6 (eval.dev_seed=3)",
    ),
    # algo=odt: its keys are in the schema too
    "odt_without_the_gaussian_head": (
        "train",
        ["algo=odt", "model.action_head=deterministic"],
        2,
        "config: online finetuning samples its exploration from the gaussian head, but model.action_head="
        "deterministic: use algo=odt",
    ),
    "gaussian_head_on_bc": ("train", ["algo=bc", "model.action_head=gaussian"], 2, "gaussian needs model.policy=dt"),
    "odt_zero_updates_per_round": (
        "train",
        ["algo=odt", "online.updates_per_round=0"],
        2,
        "config: online.updates_per_round=0 is not allowed: it must be greater",
    ),
    "odt_zero_temperature_lr": ("train", ["algo=odt", "model.temperature_lr=0"], 2, "model.temperature_lr=0 is not"),
    "odt_misspelled_key": ("train", ["algo=odt", "+online.round=3"], 2, "online.round is not a key of online (it has"),
    "exploration_seeds_overlap_reporting": (
        "train",
        ["algo=odt", "online.seed=10002"],
        2,
        "online.seed=10002 gives exploration env seeds 10002-10011, which overlap the reporting seeds "
        "10000-10003 (eval.report_seed=10000): keep the ranges apart",
    ),
    "exploration_seeds_offset_by_the_run_seed": (
        "train",
        ["algo=odt", "seed=1", "online.seed=9992"],
        2,
        "online.seed=9992 at seed=1 gives exploration env seeds 10002-10011, which overlap the reporting seeds",
    ),
    "exploration_seeds_overlap_development": (
        "train",
        ["algo=odt", "eval.dev_seed=100005"],
        2,
        "online.seed=100000 gives exploration env seeds 100000-100009, which overlap the development seeds",
    ),
    # keys that meant two things (issue 34): the old form refused, naming the new one
    "odt_typed_max_steps": (
        "train",
        ["algo=odt", "trainer.max_steps=30"],
        2,
        "config: trainer.max_steps=30 under algo=odt: give the offline pretraining as online.pretrain_steps=30",
    ),
    "odt_zero_trajectories_was_the_control": (
        "train",
        ["algo=odt", "online.trajectories_per_round=0"],
        2,
        "config: online.trajectories_per_round=0 no longer means the offline-only control: set online.collect=false",
    ),
    "retired_cpu_budget_steps": (
        "train",
        ["algo=bc", "algo.cpu_budget_steps=100"],
        2,
        "config: algo.cpu_budget_steps is no longer a key: experiment=cpu-budget's step budget per algorithm is its "
        "budget_steps.<algo.name> (budget_steps.bc=8000), anywhere else give trainer.max_steps=N",
    ),
    "retired_online_checkpoints_dir": (
        "train",
        ["algo=odt", "online.checkpoints_dir={run}/elsewhere"],
        2,
        "config: online.checkpoints_dir is no longer a key: ... set paths.checkpoints_dir=DIR",
    ),
    "budget_steps_outside_cpu_budget": (
        "train",
        ["algo=bc", "+budget_steps.bc=100"],
        2,
        "config: budget_steps.bc=100 does not act here: only experiment=cpu-budget's trainer.max_steps reads "
        "budget_steps, and only the run's algorithm's (algo.name=bc): give trainer.max_steps=100",
    ),
    # a model without a timestep table takes any horizon: the run gets past the table's check to the next
    "no_timestep_table_any_horizon": (
        "train",
        ["++model.timestep_embedding=false", "env.max_episode_steps=1001", "ckpt_path={inputs}/nope.ckpt"],
        2,
        "nope.ckpt' does not exist",
    ),
    "export_without_checkpoint": ("export", [], 2, "give ckpt_path=PATH: the dtlab checkpoint to export"),
    "evaluate_zero_episodes": ("evaluate", [f"ckpt_path={CKPT}", "eval.episodes=0"], 2, "eval.episodes=0 is not"),
    "evaluate_missing_checkpoint": ("evaluate", ["ckpt_path={inputs}/nope.ckpt"], 2, "does not exist: give"),
    "evaluate_corrupt_checkpoint": ("evaluate", ["ckpt_path={inputs}/truncated.ckpt"], 2, "cannot be loaded (..."),
    "evaluate_in_another_env": (
        "evaluate",
        [f"ckpt_path={CKPT}", "env=hopper"],
        2,
        "trained in HalfCheetah-v5 but env=Hopper-v5 was asked: evaluate it in the env it was trained in",
    ),
}


@pytest.mark.parametrize(("command", "args", "code", "message"), CASES.values(), ids=CASES.keys())
def test_bad_input_fails_fast_in_one_line(inputs, tmp_path, monkeypatch, capsys, command, args, code, message):
    run = tmp_path / "run"
    fill = {"inputs": inputs, "run": run}
    args = [a.format(**fill) for a in args]
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args.append(f"hydra.run.dir={run}")
    # a checkpoint every step: had any training step run, there would be one
    overrides = ["debug=smoke", "threads=1", "callbacks.checkpoint.every_n_train_steps=1"] if command == "train" else []
    start = time.time()
    exit_code, out, err = run_main(command, [*overrides, *args], monkeypatch, capsys)
    assert time.time() - start < 10
    assert exit_code == code
    assert "Traceback" not in out + err
    if code == 2:  # ours: exactly one line, last on stderr
        errors = [line for line in err.splitlines() if line.startswith("dtlab: error:")]
        assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0]
    fragments = message.format(**fill).split("...")
    position = 0
    for fragment in fragments:  # in this order
        position = err.find(fragment.strip(), position)
        assert position >= 0, f"{fragment.strip()!r} not in {err[-1000:]!r}"
    assert not list(run.rglob("*.ckpt"))


def test_full_traceback_on_request(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(Exception, match="unknown env id"):
        run_main("train", ["debug=smoke", f"hydra.run.dir={tmp_path}", "env.id=Nope-v0"], monkeypatch, capsys)


# Checks that an entry point makes before it imports Lightning (~9 s here), so that these
# mistakes are told at once: (command, arguments, fragment of the one line).
BEFORE_LIGHTNING = [
    ("train", ["debug=smoke", "dataset=local", "dataset.path={inputs}/nan_reward.parquet"], "rewards hold NaN"),
    ("train", ["debug=smoke", "model.context_length=1001"], "context length K=1001 exceeds"),
    ("train", ["debug=smoke", "dataset=local", "dataset.path={inputs}/zero_length_episode.parquet"], "no steps"),
    ("train", ["debug=smoke", "ckpt_path={inputs}/nope.ckpt"], "nope.ckpt' does not exist"),
    ("train", ["debug=smoke", "ckpt_path=last"], "ckpt_path=last looks for"),
    ("evaluate", ["ckpt_path={inputs}/nope.ckpt"], "nope.ckpt' does not exist"),
]
RUN_ALL = """
import importlib, json, sys
for command, args in json.loads(sys.argv[1]):
    sys.argv = [command, *args]
    try:
        importlib.import_module(f"dtlab.{command}").main()
    except SystemExit as e:
        print("exit", e.code, "lightning" in sys.modules)
"""


def test_input_errors_come_before_lightning_is_imported(inputs, tmp_path):
    fill = {"inputs": inputs}
    cases = [(c, [a.format(**fill) for a in args] + [f"hydra.run.dir={tmp_path}"]) for c, args, _ in BEFORE_LIGHTNING]
    # one fresh interpreter for all: it has not imported Lightning until one of them does
    result = subprocess.run(
        [sys.executable, "-c", RUN_ALL, json.dumps(cases)], capture_output=True, text=True, timeout=120
    )
    exits = [line for line in result.stdout.splitlines() if line.startswith("exit ")]
    assert exits == ["exit 2 False"] * len(cases), result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("dtlab: error:")]
    assert len(errors) == len(cases), result.stderr
    for (_, _, fragment), error in zip(BEFORE_LIGHTNING, errors, strict=True):
        assert fragment in error
