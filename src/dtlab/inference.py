"""Inference backends for rollouts, and policies exported to run without dtlab.

The model is most of a rollout's wall time, and on a CPU eager PyTorch spends part of it
outside the arithmetic. A backend runs the same function on static shapes (the attention mask
is always an input, so the padded first K-1 steps go through the same graph):

- `eager`: the model as it is;
- `jit`: `torch.jit.trace` then `torch.jit.freeze`;
- `onnxruntime`: the model exported to ONNX (opset 17) and run by ONNX Runtime
  (`pip install 'dtlab[onnx]'`).

`auto` picks the fastest exact one measured (benchmarks/eval_throughput.py, `FASTEST`):
onnxruntime at one torch thread, how sweeps run their jobs side by side. At more threads
`eval.workers=auto` (`resolve_workers`) splits the envs into two groups, each stepped in a
forked process of its own at one torch thread, so auto is onnxruntime there too. Threads of
one process could not do that: the step loop's Python holds the GIL, and a two-thread rollout
in threads ran at only 0.96-1.40x eager's two-thread one at 2 x 10 envs (three quiet runs on
the results' K=5 HalfCheetah medium checkpoint); in processes at 1.40-2.08x (four runs; docs/notes.md).
In one process no exact backend can give much more than eager: the model's matrix products,
which every backend still computes, are ~80% of eager's model time, and the envs ~20% of the
rollout (`bound` in the benchmark); ONNX Runtime ran at 1.06-1.13x eager's env steps/s at one
thread, jit at 1.01-1.04x. Without onnxruntime, auto is eager, with one log line.

A build costs an ONNX session (0.02-0.04 s) and, the first time for a model, its export
(0.15-0.3 s): the graph is kept per model and each build puts the current weights into it, as
they change between evaluations (and online rounds). Every build is checked against eager on
a padded and a full window (1e-5) before a rollout uses it; a policy a backend cannot take, or
fails that check, runs eager, with one log line.

`export_policy` writes one file (ONNX or TorchScript) mapping a K-step window of raw
observations, actions, raw returns-to-go and timesteps to the next action, state
normalization and reward scale baked in, with its metadata beside it (`<file>.json`).
"""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import logging
import sys
import warnings
import weakref
from pathlib import Path

import torch
from torch import nn

from dtlab import DTLabError
from dtlab.policy import Policy

log = logging.getLogger(__name__)
BACKENDS = ("auto", "eager", "jit", "onnxruntime")
# eval.backend=auto on CPU: the fastest exact backend measured by benchmarks/eval_throughput.py
# for torch's thread count (threads=1 is how sweeps run jobs side by side); eager elsewhere
FASTEST = {1: "onnxruntime"}
# ONNX Runtime session config entries, its defaults unless set (benchmarks/eval_throughput.py
# tries no spinning of its thread pool between calls at more than one thread)
ORT_CONFIG: dict[str, str] = {}
_said: set[str] = set()  # warnings logged once a process
INPUTS = ("observations", "actions", "returns_to_go", "timesteps", "mask")


class _Core(nn.Module):
    """The model on normalized windows, mask always given: the function every backend runs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, states, actions, returns_to_go, timesteps, mask):  # noqa: ANN001, ANN201 - traced
        return self.model(states, actions, returns_to_go, timesteps, mask, last_only=True)


class RawWindowPolicy(nn.Module):
    """What `export_policy` writes: raw observations (B, K, obs_dim) float32, actions (B, K,
    act_dim) float32, raw returns-to-go (B, K) float32, timesteps (B, K) int64 and mask (B, K)
    bool (True at real steps; windows left-padded) -> the next action (B, act_dim)."""

    def __init__(self, policy: Policy) -> None:
        super().__init__()
        self.model = policy.model
        self.register_buffer("state_mean", policy.state_mean.detach().float().clone())
        self.register_buffer("state_std", policy.state_std.detach().float().clone())
        self.reward_scale = float(policy.reward_scale)

    def forward(self, observations, actions, returns_to_go, timesteps, mask):  # noqa: ANN001, ANN201 - traced
        states = (observations - self.state_mean) / self.state_std
        return self.model(states, actions, returns_to_go * self.reward_scale, timesteps, mask, last_only=True)


def _example(policy: Policy, batch: int) -> tuple[torch.Tensor, ...]:
    c, device = policy.model.config, policy.state_mean.device
    K = c.context_length
    mask = torch.ones(batch, K, dtype=torch.bool, device=device)
    mask[:, : K - 1] = False  # a padded window: the mask is a real input of the graph
    return (
        torch.zeros(batch, K, c.state_dim, device=device),
        torch.zeros(batch, K, c.act_dim, device=device),
        torch.zeros(batch, K, device=device),
        torch.zeros(batch, K, dtype=torch.long, device=device),
        mask,
    )


def resolve_workers(workers: int | str, device: torch.device) -> int:
    """`auto` -> two env groups on a CPU with two or more torch threads, on Linux (the fastest
    measured on 2 cores; more workers on more cores are unmeasured), else one. An int is itself;
    more than one needs Linux, where the rollout forks its workers."""
    if workers != "auto":
        if not isinstance(workers, int) or workers < 1:
            raise DTLabError(f"eval.workers={workers!r} must be auto or an integer of at least 1")
        if workers > 1 and device.type != "cpu":  # a forked process cannot use the parent's CUDA
            raise DTLabError(
                f"eval.workers={workers} forks worker processes, which run on CPU only: use eval.workers=1 "
                f"or auto on {device}"
            )
        if workers > 1 and not sys.platform.startswith("linux"):
            raise DTLabError(
                f"eval.workers={workers} forks worker processes, which dtlab does on Linux only, not on "
                f"{sys.platform}: use eval.workers=1 or auto"
            )
        return workers
    return 2 if device.type == "cpu" and torch.get_num_threads() >= 2 and sys.platform.startswith("linux") else 1


def resolve_backend(backend: str, device: torch.device) -> str:
    """`auto` -> the fastest exact backend measured for this device and torch's thread count
    (`FASTEST`); onnxruntime where it cannot run (not installed, or not a CPU) -> eager, the
    next fastest (jit measured no faster than eager on rollouts), with one log line."""
    if backend not in BACKENDS:
        raise DTLabError(f"eval.backend={backend!r} is unknown: use one of {', '.join(BACKENDS)}")
    asked = backend
    if backend == "auto":
        backend = FASTEST.get(torch.get_num_threads(), "eager") if device.type == "cpu" else "eager"
    if backend in ("eager", "jit"):
        return backend
    if device.type != "cpu":  # the ONNX session here is a CPU one
        log.warning("eval.backend=onnxruntime runs on CPU only: using eager on %s", device)
        return "eager"
    missing = [name for name in ("onnxruntime", "onnx") if importlib.util.find_spec(name) is None]
    if missing:
        what = " and ".join(missing)
        message = f"eval.backend={asked}: {what} not installed (pip install 'dtlab[onnx]'): using eager"
        if message not in _said:  # once a process, not at every evaluation of a run
            _said.add(message)
            log.warning(message)
        return "eager"
    return "onnxruntime"


class BackendPolicy:
    """`Policy.act` through a backend: the rollout's interface (`act(window)`, `normalize`,
    `scale`, `model`, ...), the model call replaced."""

    def __init__(self, policy: Policy, backend: str, batch: int) -> None:
        if backend not in ("jit", "onnxruntime"):
            raise DTLabError(f"BackendPolicy runs jit or onnxruntime, not {backend!r}: eager is the Policy itself")
        self.policy, self.backend = policy, backend
        core, example = _Core(policy.model), _example(policy, batch)
        training = policy.model.training  # traced in eval mode; the caller's mode is left as it was
        core.eval()
        try:
            if backend == "jit":
                with torch.no_grad():
                    self._run = torch.jit.freeze(torch.jit.trace(core, example))
            else:
                self._run = _onnx_session(core, example)
            _check(self._run, core, policy)
        finally:
            policy.model.train(training)

    def __getattr__(self, name: str):  # noqa: ANN204 - everything but act is the policy's own
        return getattr(self.policy, name)

    def act(self, window: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._run(*(window[k] for k in ("states", "actions", "returns_to_go", "timesteps", "mask")))


@torch.no_grad()
def _check(run, core: nn.Module, policy: Policy) -> None:  # noqa: ANN001 - a callable
    """Refuse a built backend whose actions are not eager's to 1e-5 on two random windows, one
    padded and one full: the last guard of the evaluation's numbers (~10 ms a build)."""
    c, device = policy.model.config, policy.state_mean.device
    K, g = c.context_length, torch.Generator().manual_seed(0)
    window = (
        torch.randn(2, K, c.state_dim, generator=g).to(device),
        (torch.rand(2, K, c.act_dim, generator=g) * 2 - 1).to(device),
        torch.randn(2, K, generator=g).to(device),
        torch.arange(K, device=device).expand(2, K),
        torch.arange(K, device=device)[None] >= torch.tensor([[K - 1], [0]], device=device),
    )
    diff = (run(*window) - core(*window)).abs().max().item()
    if not diff <= 1e-5:  # NaN fails too
        raise DTLabError(f"its actions differ from eager's by {diff:.1e} > 1e-5")


# model -> its ONNX graph, exported once: an export takes 0.15-0.3 s, a session 0.02-0.04 s, and
# every evaluation of a training run (and every online round) has new weights for the same graph
_graphs: weakref.WeakKeyDictionary[nn.Module, object] = weakref.WeakKeyDictionary()


def _onnx_graph(core: _Core, example: tuple[torch.Tensor, ...]) -> bytes:
    """The serialized ONNX graph of `core` with its current weights."""
    from onnx import numpy_helper

    graph = _graphs.get(core.model)
    if graph is None:
        import onnx

        # Exported unfolded, every initializer is a parameter or buffer under its own name, so
        # new weights replace them one for one (ONNX Runtime folds the graph itself, measured as
        # fast). The exporter merges initializers of equal value (a fresh model's zero biases):
        # it exports a copy with distinct random parameters.
        probe, g = copy.deepcopy(core), torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in probe.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        buffer = io.BytesIO()
        _export_onnx(probe, example, buffer, fold_constants=False)
        graph = _graphs[core.model] = onnx.load_from_string(buffer.getvalue())
    tensors = dict(core.named_parameters()) | dict(core.named_buffers())
    for init in graph.graph.initializer:
        if init.name in tensors:  # anything else is a constant of the graph, not a weight
            init.CopyFrom(numpy_helper.from_array(tensors[init.name].detach().cpu().numpy(), init.name))
    return graph.SerializeToString()


def _onnx_session(core: _Core, example: tuple[torch.Tensor, ...]):  # noqa: ANN202 - a callable
    import onnxruntime as ort

    options = ort.SessionOptions()
    # ONNX Runtime's defaults are the fastest measured (all graph optimizations, the memory
    # arena, sequential execution); only its thread count follows torch's (threads=1 for
    # side-by-side jobs).
    options.intra_op_num_threads = torch.get_num_threads()
    for key, value in ORT_CONFIG.items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(_onnx_graph(core, example), options, providers=["CPUExecutionProvider"])

    wanted = {i.name for i in session.get_inputs()}  # the exporter drops inputs a model never reads (BC's)

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        feed = {name: x.cpu().numpy() for name, x in zip(INPUTS, inputs, strict=True) if name in wanted}
        return torch.from_numpy(session.run(["action"], feed)[0])

    return run


def _export_onnx(
    module: nn.Module, example: tuple[torch.Tensor, ...], f: io.BytesIO | str | Path, fold_constants: bool = True
) -> None:
    axes = {name: {0: "batch"} for name in (*INPUTS, "action")}
    # The TorchScript-based exporter (dynamo=False: the torch.export one needs onnxscript and
    # gave no faster graph) warns that it is legacy and about constant folding it skips.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            example,
            f,
            input_names=list(INPUTS),
            output_names=["action"],
            dynamic_axes=axes,
            opset_version=17,
            do_constant_folding=fold_constants,
            dynamo=False,
        )


def for_rollout(policy: Policy, backend: str, batch: int) -> Policy | BackendPolicy:
    """The policy a rollout of `batch` envs should call: built once, for these weights."""
    chosen = resolve_backend(backend, policy.state_mean.device)
    if chosen == "eager":
        return policy
    try:
        return BackendPolicy(policy, chosen, batch)
    except Exception as e:  # noqa: BLE001 - any policy a backend cannot take runs eager
        log.warning("eval.backend=%s cannot run %s (%s): using eager", chosen, type(policy.model).__name__, e)
        return policy


def export_policy(policy: Policy, fmt: str, out: Path, metadata: dict) -> Path:
    """Write `policy` as one standalone file (`onnx` or `torchscript`) and its metadata beside
    it (`<out>.json`; TorchScript also holds it inside, as the extra file `dtlab.json`)."""
    module = RawWindowPolicy(policy).eval()
    example = _example(policy, 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        _export_onnx(module, example, out)
        import onnx

        # the exporter leaves out inputs the policy never reads (BC: actions, returns-to-go and
        # timesteps; a DT without a timestep table: timesteps), so say which the file takes
        metadata = {**metadata, "inputs": [i.name for i in onnx.load(str(out)).graph.input]}
    elif fmt == "torchscript":
        with torch.no_grad():
            traced = torch.jit.freeze(torch.jit.trace(module, example))
        torch.jit.save(traced, out, _extra_files={"dtlab.json": json.dumps(metadata)})
    else:
        raise DTLabError(f"format={fmt!r} is unknown: use onnx or torchscript")
    Path(f"{out}.json").write_text(json.dumps(metadata, indent=2))
    return out
