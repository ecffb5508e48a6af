import os

# Never the network, never a GL window. Set before anything imports datasets, huggingface_hub
# or wandb: they read these once, at import.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
# Under pytest-xdist (`pytest -n 2`, the README's command) each worker shares the cores with
# the others: one torch thread per worker, and per subprocess it starts, or two processes that
# each take both cores run many times slower (../shared/MACHINE-NOTES.md). Set before torch loads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

import importlib  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from dtlab.cli import CONF_DIR  # noqa: E402

# And a guard, since a library that goes online anyway (as datasets did when the variable was
# set after its import) would only show up as a slow test: any connection beyond this machine
# fails at once and fails the test, even where a library swallows the error.
_network_attempts: list = []
_connect = socket.socket.connect


def _connect_locally_only(sock: socket.socket, address) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
        _network_attempts.append(address)
        raise OSError(f"tests must not use the network (tried {address})")
    _connect(sock, address)


socket.socket.connect = _connect_locally_only


_reported = [0]  # attempts already failed a test


@pytest.fixture(autouse=True)
def _no_network_and_threads_restored():
    """Fails the test during which (its module fixtures' setup included) a connection was tried,
    even where a library swallowed the OSError: per test, since under pytest-xdist a worker's
    session status never reaches the run's. And restores torch's thread count, which a run
    with `threads=N` sets for the process, so that no test runs at another test's count."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    if len(_network_attempts) > _reported[0]:
        tried, _reported[0] = _network_attempts[_reported[0] :], len(_network_attempts)
        pytest.fail(f"a connection beyond this machine was tried: {tried}")


def pytest_sessionfinish(session: pytest.Session) -> None:
    if len(_network_attempts) > _reported[0]:  # after the last test (serial runs: in the status)
        print(f"\ntests tried to reach the network: {_network_attempts[_reported[0] :]}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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


def drawn_episodes(sampler, episodes, n: int, seed: int = 0) -> np.ndarray:
    """The episode of each of `n` windows that `sampler.sample()` draws, found from the
    window's last state (always a real step) among all the sampler's states: what sample()
    does, not what its probabilities say it should do. Needs distinct states."""
    batch = sampler.sample(n, torch.Generator().manual_seed(seed))
    rows = torch.cdist(batch["states"][:, -1].double(), sampler.states.double()).argmin(dim=1).numpy()
    return np.searchsorted(episodes.starts, rows, side="right") - 1


def random_module(**overrides):  # noqa: ANN201 - a DTModule
    """A small DTModule for HalfCheetah with a random (seeded) state normalization, as if
    trained on some data: for tests of what rollouts and backends feed it."""
    from dtlab.module import DTModule

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    args = {
        "env_id": "HalfCheetah-v5",
        "state_dim": 17,
        "act_dim": 6,
        "max_ep_len": 1000,
        "state_mean": rng.normal(size=17).tolist(),
        "state_std": rng.uniform(0.5, 2, 17).tolist(),
        "reward_scale": 0.001,
        "n_layer": 2,
        "n_head": 2,
        "activation": "relu",
    }
    return DTModule(**(args | overrides))


def run_main(command: str, args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """`python -m dtlab.<command> ARGS`, in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [f"dtlab.{command}", *args])
    with pytest.raises(SystemExit) as exit:
        importlib.import_module(f"dtlab.{command}").main()
    out = capsys.readouterr()
    return exit.value.code, out.out, out.err


def one_error_line(err: str) -> str:
    """The one `dtlab: error:` line an entry point ends with on bad input (and no traceback)."""
    errors = [line for line in err.splitlines() if line.startswith("dtlab: error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err, err[-3000:]
    return errors[0]
