"""The config's schema: every key dtlab reads, its type and the values allowed, declared once.

`check_config` runs first in `dtlab.train` and `dtlab.evaluate`, before any data, model or
Lightning exists, and turns the first bad value into one line that names the key, the value
and what is allowed (exit 2). A group's keys are the arguments of what it instantiates
(`model` -> PolicyModule, `data` -> TrajectoryDataModule, ...), so a key added to the code is
added here too; `tests/test_train.py` checks every shipped config against this schema.
Keys that belong to other libraries (Lightning's Trainer, loggers, Hydra) pass through,
except the few dtlab relies on.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Annotated, Literal

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dtlab import DTLabError

Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]


class _Group(BaseModel):
    """A config group whose keys are all known: a typo is an error, not a silently unused key."""

    model_config = ConfigDict(extra="forbid", strict=False, populate_by_name=True)
    target: str | None = Field(None, alias="_target_")
    partial: bool | None = Field(None, alias="_partial_")
    convert: str | None = Field(None, alias="_convert_")


class _Open(BaseModel):
    """A group that also holds keys of another library (Lightning's Trainer): checked where
    dtlab depends on them, passed through otherwise."""

    model_config = ConfigDict(extra="allow", strict=False)


class Model(_Group):  # dtlab.module.PolicyModule
    n_layer: Positive
    n_head: Positive
    n_embd: Positive
    context_length: Positive
    dropout: Fraction
    activation: Literal["relu", "gelu", "gelu_tanh"] = "gelu"
    action_tanh: bool = True
    timestep_embedding: bool = True  # the paper's; false: none (conf/model/cpu.yaml says why)
    init: Literal["reference", "gpt2"] = "gpt2"  # dtlab.model.DTConfig; model=small: reference
    return_init: Literal["gpt2", "torch"] = "gpt2"  # before `init`: torch = gpt2 but the return embedding
    learning_rate: Annotated[float, Field(gt=0.0)]
    weight_decay: Annotated[float, Field(ge=0.0)]
    betas: tuple[Fraction, Fraction]
    warmup_steps: NonNegative
    lr_schedule: Literal["constant", "cosine"]
    compile: bool
    policy: Literal["dt", "mlp_bc"] = "dt"  # conf/algo/
    action_head: Literal["deterministic", "gaussian"] = "deterministic"  # gaussian: algo=odt
    init_temperature: Annotated[float, Field(gt=0.0)] = 0.1
    temperature_lr: Annotated[float, Field(gt=0.0)] = 1.0e-4
    target_entropy: float | None = None  # null: -act_dim

    @model_validator(mode="after")
    def _heads_divide_width(self) -> Model:
        if self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}: "
                "each head gets n_embd / n_head dims"
            )
        if self.action_head == "gaussian" and self.policy != "dt":
            raise ValueError(f"model.action_head=gaussian needs model.policy=dt: {self.policy} has no gaussian head")
        if self.action_head == "gaussian" and not self.action_tanh:
            raise ValueError("model.action_head=gaussian is tanh-squashed: it needs model.action_tanh=true")
        return self


class Data(_Group):  # dtlab.datamodule.TrajectoryDataModule
    max_ep_len: Positive
    context_length: Positive
    batch_size: Positive
    reward_scale: Annotated[float, Field(gt=0.0)]
    val_fraction: Fraction
    val_batches: Positive
    seed: NonNegative
    ref_scores: tuple[float, float] | None = None
    top_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    start_share: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    start_steps: Positive = 100


class Eval(_Group):  # dtlab.callbacks.EvaluationCallback, dtlab.evaluate
    episodes: Positive  # per target return
    seed: NonNegative
    every_n_steps: NonNegative  # 0: only at the last step
    final_episodes: NonNegative  # 0: no final evaluation
    report_seed: NonNegative
    dev_seed: NonNegative | None = None  # development seeds: the final evaluation of a run that chooses
    vector_mode: Literal["sync", "async"]
    backend: Literal["auto", "eager", "jit", "onnxruntime"] = "auto"  # dtlab.inference
    workers: Positive | Literal["auto"] = "auto"  # dtlab.rollout: groups of envs stepped in processes
    video: bool
    video_frames: Positive


class TargetReturn(_Group):  # conf/target_return/*.yaml, read by dtlab.rollout.resolve_targets
    values: list[float] = []  # raw returns
    quantiles: list[Annotated[float, Field(ge=0.0, le=1.0)]] = []  # of the data's episode returns
    max_multiples: list[Annotated[float, Field(gt=0.0)]] = []  # of the data's best episode return
    final_sweep_points: NonNegative = 0  # final evaluation only: targets across the data's range
    final_sweep_top: Annotated[float, Field(gt=0.0)] = 1.2  # ... up to this multiple of its best


class Env(_Open):  # conf/env/*.yaml
    id: str
    obs_dim: Positive
    act_dim: Positive
    max_episode_steps: Positive
    max_ep_len: Positive | None = None
    ref_min_score: float
    ref_max_score: float
    target_returns: list[float] = []

    @model_validator(mode="after")
    def _reference_order(self) -> Env:
        if self.ref_max_score <= self.ref_min_score:
            raise ValueError(
                f"env.ref_max_score={self.ref_max_score} must exceed env.ref_min_score={self.ref_min_score}"
            )
        return self


class Trainer(_Open):  # lightning.pytorch.Trainer: the keys dtlab's data stream and schedules rely on
    max_steps: Positive  # the batch stream is endless: -1 (Lightning's "no limit") would never end
    val_check_interval: Positive | Annotated[float, Field(gt=0.0, le=1.0)]
    log_every_n_steps: Positive
    gradient_clip_val: Annotated[float, Field(ge=0.0)] | None = None


class Online(_Group):  # dtlab.online.OnlineFinetuning (algo=odt; dtlab.train passes env, targets, checkpoints dir)
    pretrain_steps: NonNegative  # offline steps before the first round; trainer.max_steps is derived
    rounds: NonNegative
    updates_per_round: Positive
    trajectories_per_round: Positive
    collect: bool  # false: collect nothing, the offline-only control
    buffer_size: Positive  # trajectories
    explore_return_multiple: Annotated[float, Field(gt=0.0)]  # of the highest in-training target
    seed: NonNegative  # exploration env seeds: dtlab.protocol.exploration_seeds
    per_run_seeds: bool  # false: every run seed explores from the same env seeds (before issue 34)

    @field_validator("trajectories_per_round", mode="before")
    @classmethod
    def _zero_was_the_control(cls, value: object) -> object:
        if value == 0:  # before issue 34, 0 meant "collect nothing"
            raise ValueError(
                "online.trajectories_per_round=0 no longer means the offline-only control: set online.collect=false"
            )
        return value


class _Command(BaseModel):
    model_config = ConfigDict(extra="allow", strict=False)
    seed: NonNegative = 0
    threads: Positive | None = None
    eval: Eval


class Algo(_Group):  # conf/algo/*.yaml
    name: str


class TrainConfig(_Command):  # conf/train.yaml
    algo: Algo
    target_return: TargetReturn
    env: Env
    model: Model
    data: Data
    trainer: Trainer
    online: Online | None = None  # algo=odt

    @model_validator(mode="after")
    def _online_needs_the_gaussian_head(self) -> TrainConfig:
        if self.online is not None and self.model.action_head != "gaussian":
            raise ValueError(
                f"online finetuning samples its exploration from the gaussian head, but model.action_head="
                f"{self.model.action_head}: use algo=odt (or model.action_head=gaussian)"
            )
        if self.online is not None and self.online.pretrain_steps + self.online.rounds == 0:
            raise ValueError("online.pretrain_steps=0 and online.rounds=0 leave nothing to train: set either above 0")
        return self


class EvaluateEval(Eval):  # conf/evaluate.yaml: null is the run's final evaluation's (dtlab.evaluate)
    episodes: Positive | None = None
    seed: NonNegative | None = None
    backend: Literal["auto", "eager", "jit", "onnxruntime"] | None = None
    workers: Positive | Literal["auto"] | None = None


class EvaluateConfig(_Command):  # conf/evaluate.yaml
    eval: EvaluateEval
    env: Env | None = None
    hf_reward_scale: Annotated[float, Field(gt=0.0)] = 0.001


class EvaluateTargets(BaseModel):  # dtlab.evaluate, once the env is known (paper targets are the env's)
    model_config = ConfigDict(extra="allow")
    target_return: TargetReturn


def check_loader_keys(dataset: DictConfig, prefix: str = "dataset") -> None:
    """The `dataset` group's keys are the arguments of the loader it names (dtlab.data.load_*):
    a misspelled one would otherwise fail only inside the loader, as a TypeError; a missing one
    (`???`, or an argument without a default that is not given) in Hydra's partial
    instantiation would be left out, and the loader run with its default. Mixture sources are
    dataset configs too, checked the same way (`dataset.sources.expert.path`)."""
    target = dataset.get("_target_")
    if not isinstance(target, str) or "." not in target:
        return
    module, _, name = target.rpartition(".")
    try:
        loader = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise DTLabError(f"config: {prefix}._target_={target!r} cannot be imported: check the name") from None
    parameters = inspect.signature(loader).parameters
    takes = list(parameters)
    for key in dataset:
        if not str(key).startswith("_") and key not in takes:
            hint = " (dataset=local dataset.path=FILE for a file of your own)" if name == "load_sample" else ""
            raise DTLabError(
                f"config: {prefix}.{key} is not an argument of {target} (it takes {', '.join(takes) or 'none'}): "
                f"fix the spelling{hint}"
            )
    for key, parameter in parameters.items():
        if OmegaConf.is_missing(dataset, key) if key in dataset else parameter.default is inspect.Parameter.empty:
            example = {"path": "FILE", "name": "NAME", "sources": "{NAME: {...}}"}.get(key, "VALUE")
            raise DTLabError(f"config: {prefix}.{key} is missing: set it with {prefix}.{key}={example}")
        if key in ("path", "name") and key in dataset and dataset[key] is None:
            raise DTLabError(
                f"config: {prefix}.{key}=null: set it with {prefix}.{key}={key.upper() if key == 'name' else 'FILE'}"
                + (" (the embedded sample is dataset=sample, no longer a null path)" if name == "load_local" else "")
            )
    sources = dataset.get("sources") if not OmegaConf.is_missing(dataset, "sources") else None
    if isinstance(sources, DictConfig):
        for source, sub in sources.items():
            if isinstance(sub, DictConfig):
                check_loader_keys(sub, f"{prefix}.sources.{source}")


# Top-level keys a preset requires (`???`), and what to give for them
REQUIRED = {
    "data_dir": "the folder of the datasets' Parquet files (docs/data.md says how to get or rebuild them)",
}
# Keys that are gone (issue 34), and what says the same now
RETIRED = {
    "algo.cpu_budget_steps": "experiment=cpu-budget's step budget per algorithm is its budget_steps.<algo.name> "
    "(budget_steps.bc=8000), anywhere else give trainer.max_steps=N",
    "online.checkpoints_dir": "online finetuning writes pretrained.ckpt into paths.checkpoints_dir, as every "
    "checkpoint: set paths.checkpoints_dir=DIR",
}


def check_retired(overrides: list[str]) -> None:
    """Refuse a retired key typed on the command line, before Hydra, whose own error for a key
    its config no longer has is a paragraph that names no replacement."""
    for key in _keys(overrides):
        if key in RETIRED:
            raise DTLabError(f"config: {key} is no longer a key: {RETIRED[key]}")


def _keys(overrides: list[str]) -> list[str]:
    """The keys of Hydra overrides (`+a.b=1`, `++a.b=1`, `~a.b`: a.b); group choices included."""
    return [o.lstrip("+~").split("=", 1)[0] for o in overrides]


def typed_overrides(cfg: DictConfig) -> dict[str, str]:
    """{key: value} of what the user typed (Hydra's task overrides; under the compose API those
    of `return_hydra_config=True`), {} for a config built by hand."""
    if OmegaConf.select(cfg, "hydra.overrides.task") is not None:
        overrides = list(cfg.hydra.overrides.task)
    elif HydraConfig.initialized():
        overrides = list(HydraConfig.get().overrides.task)
    else:
        overrides = []
    return {key: o.split("=", 1)[-1] for key, o in zip(_keys(overrides), overrides, strict=True)}


def check_keys_act(cfg: DictConfig) -> None:
    """Keys whose meaning used to shift, each refused where it would not mean what it says:
    a typed trainer.max_steps under algo=odt (the total is derived from online.pretrain_steps);
    a typed budget_steps.<algo> that experiment=cpu-budget's trainer.max_steps does not read."""
    typed = typed_overrides(cfg)
    if cfg.get("online") is not None and "trainer.max_steps" in typed:
        steps = typed["trainer.max_steps"]
        raise DTLabError(
            f"config: trainer.max_steps={steps} under algo=odt: give the offline pretraining as "
            f"online.pretrain_steps={steps} (dtlab.train derives trainer.max_steps: pretrain_steps + rounds x "
            "updates_per_round)"
        )
    trainer = cfg.get("trainer")
    reads = OmegaConf.to_container(trainer, resolve=False).get("max_steps") if isinstance(trainer, DictConfig) else None
    algo = OmegaConf.select(cfg, "algo.name")
    for key in typed:
        if key.startswith("budget_steps") and not ("budget_steps" in str(reads) and key == f"budget_steps.{algo}"):
            raise DTLabError(
                f"config: {key}={typed[key]} does not act here: only experiment=cpu-budget's trainer.max_steps reads "
                f"budget_steps, and only the run's algorithm's (algo.name={algo}): give trainer.max_steps="
                f"{typed[key]}"
            )


def check_config(cfg: DictConfig, schema: type[BaseModel] = TrainConfig) -> None:
    """Raise DTLabError naming the first key of `cfg` that `schema` does not allow."""
    for key, what in REQUIRED.items():
        if OmegaConf.is_missing(cfg, key):  # (`key in cfg` is False for a ??? value)
            raise DTLabError(f"config: {key} is missing: give {key}=PATH, {what}")
    for key, instead in RETIRED.items():
        if OmegaConf.select(cfg, key, default=None) is not None:
            raise DTLabError(f"config: {key} is no longer a key: {instead}")
    check_keys_act(cfg)
    groups = {}
    for name in schema.model_fields:
        if name in cfg:
            node = cfg[name]
            groups[name] = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    try:
        schema.model_validate(groups)
    except ValidationError as e:
        errors = e.errors()
        # a union's branches fail each with an error of their own at the same key: say them all
        first = [err for err in errors if _key(err, groups) == _key(errors[0], groups)]
        raise DTLabError(_one_line(first, groups)) from None
    if isinstance(cfg.get("dataset"), DictConfig):
        check_loader_keys(cfg.dataset)


def _key(error: dict, given: dict) -> tuple[str, list[str], object]:
    """The error's key, its path and the value there: its location as far as it indexes the
    config (a union adds the name of the type it tried, e.g. `int`, which is no key)."""
    path, value = [], given
    for part in error["loc"]:
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            break
        path.append(str(part))
    return ".".join(path), path, value


def _one_line(errors: list[dict], given: dict) -> str:
    error = errors[0]
    key, path, value = _key(error, given)
    if error["type"] == "value_error":  # a check across keys: its message names them
        return f"config: {error['msg'].removeprefix('Value error, ')}"
    if error["type"] == "extra_forbidden":
        key = ".".join(str(p) for p in error["loc"])
        group = given.get(path[0], {}) if path else {}
        known = sorted(k for k in group if not k.startswith("_") and k != error["loc"][-1])
        return f"config: {key} is not a key of {path[0]} (it has {', '.join(known)}): check the spelling"
    if error["type"] == "missing":
        key = ".".join(str(p) for p in error["loc"])
        return f"config: {key} is missing: set it with {key}=VALUE"
    allowed = " or ".join(err["msg"].replace("Input should be ", "", 1) for err in errors)
    return f"config: {key}={value!r} is not allowed: it must be {allowed}"
