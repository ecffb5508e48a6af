"""The periodic evaluation callback, and the media it makes (return-conditioning plot, videos).
The Online Decision Transformer's stage, once here, is dtlab.online's (still importable from
here, as configs written before name it `dtlab.callbacks.OnlineFinetuning`)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch

from dtlab import DTLabError
from dtlab.checkpoint import checkpoint_facts, evaluation_due, module_from_checkpoint, read_checkpoint
from dtlab.online import ONLINE_ENV_STEPS, OnlineFinetuning  # noqa: F401 - OnlineFinetuning: its old home
from dtlab.policy import Policy
from dtlab.protocol import check_seed_ranges, evaluation_record, final_seeds, protocol, resolve_targets
from dtlab.rollout import NonFiniteRollout, planned_execution, rollout

log = logging.getLogger(__name__)


def plot_return_conditioning(
    episodes: Sequence[Mapping], dataset_returns: Sequence[float] | None, path: Path, title: str = ""
) -> Path:
    """Achieved against target return (the DT paper's Figure 4): the mean and std over
    episodes per target, each episode as a dot, the diagonal where achieved = target, and the
    dataset's range of episode returns shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = np.array([e["target"] for e in episodes])
    returns = np.array([e["return"] for e in episodes])
    unique = np.unique(targets)
    means = np.array([returns[targets == t].mean() for t in unique])
    stds = np.array([returns[targets == t].std() for t in unique])
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    lo = min(targets.min(), returns.min(), *(dataset_returns if dataset_returns is not None else []))
    hi = max(targets.max(), returns.max(), *(dataset_returns if dataset_returns is not None else []))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="achieved = target")
    if dataset_returns is not None and len(dataset_returns):
        ax.axhspan(min(dataset_returns), max(dataset_returns), color="tab:gray", alpha=0.2, label="dataset returns")
    ax.scatter(targets, returns, s=8, alpha=0.4, color="tab:blue")
    ax.errorbar(unique, means, yerr=stds, fmt="o-", color="tab:blue", capsize=3, label="Decision Transformer")
    ax.set_xlabel("target return")
    ax.set_ylabel("achieved return")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_video(frames: Sequence[np.ndarray], path: Path, fps: int = 20) -> Path:
    """MP4 through imageio-ffmpeg. HalfCheetah's control step is 0.05 s, so 20 fps is real time."""
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.mimwrite(path, list(frames), fps=fps, macro_block_size=1)
    return path


class EvaluationCallback(L.Callback):
    """In-training evaluation, on the *selection* seeds: every `every_n_steps` training steps,
    and at the last step, run the rollouts with the current weights in eval mode and log
    `eval/<target>/return_mean|return_std|normalized_score`, `eval/normalized_score` (the max
    over targets: what best.ckpt and sweepers select on) and `eval/normalized_score_best` (the
    best so far). Writes the return-conditioning plot (and, with `video`, one MP4 per target)
    under `output_dir/eval/`, and hands them and a table of the episodes to loggers that take
    media (W&B: image, `wandb.Video`, `wandb.Table`).

    The final evaluation, when fit ends, on the *reporting* seeds (`report_seed` on, never
    used to select anything; the *development* seeds, `dev_seed` on, when it is set):
    `last.ckpt` and `best.ckpt` from `checkpoints_dir` (and `pretrained.ckpt`, the end of an
    online run's offline pretraining, where there is one),
    each read back from its file, `final_episodes` per target, written to
    `output_dir/final_evaluation.json` with their protocol and logged as
    `final/{last,best,pretrained}/<target>/...`. `final_episodes=0` skips it."""

    def __init__(
        self,
        env: Mapping,
        target_return: Mapping,
        output_dir: str,
        episodes: int = 10,
        seed: int = 0,
        every_n_steps: int = 500,
        vector_mode: str = "sync",
        video: bool = False,
        video_frames: int = 200,
        final_episodes: int = 10,
        report_seed: int = 10_000,
        dev_seed: int | None = None,
        checkpoints_dir: str | None = None,
        backend: str = "eager",
        workers: int | str = 1,
    ) -> None:
        self.env, self.target_return = env, target_return
        self.run_dir = Path(output_dir)
        self.output_dir = self.run_dir / "eval"
        self.final_episodes, self.report_seed, self.backend = final_episodes, report_seed, backend
        self.dev_seed = dev_seed
        self.workers = workers
        self.checkpoints_dir = Path(checkpoints_dir) if checkpoints_dir else self.run_dir / "checkpoints"
        self.final: dict | None = None  # the final evaluation's report (on rank 0)
        self.selection_seeds: list[int] | None = None
        # The run's identity in final_evaluation.json (dtlab.report counts each run once, however
        # many folders reach it); kept in checkpoints, so a resumed run keeps it.
        self.run_id = uuid.uuid4().hex
        self.final_plan: dict | None = None  # how the final evaluation will run (planned_execution)
        # Kept in checkpoints, so that a resumed run's record covers all of it: the fit's wall
        # time before this launch, and every in-training evaluation's summary.
        self.elapsed, self.launched = 0.0, None
        self.history: list[dict] = []
        self.episodes, self.seed, self.every_n_steps = episodes, seed, every_n_steps
        self.vector_mode, self.video, self.video_frames = vector_mode, video, video_frames
        self.last: dict | None = None  # the latest rollout result (on rank 0)
        self.best = float("-inf")  # best eval/normalized_score so far, kept in checkpoints for resuming

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Bad target returns fail now, not at the first evaluation hours into the run.
        returns = getattr(trainer.datamodule, "episode_returns", None)
        targets, final = (resolve_targets(self.target_return, returns, final=f) for f in (False, True))
        check_seed_ranges(
            len(targets), self.seed, self.episodes, len(final), self.report_seed, self.final_episodes, self.dev_seed
        )
        self.selection_seeds = [self.seed, self.seed + len(targets) * self.episodes - 1]
        n = len(final) * self.final_episodes
        plan = planned_execution(self.backend, self.workers, pl_module.device, max(n, 1))
        seed, role = final_seeds(self.report_seed, self.dev_seed)  # what dtlab.evaluate repeats by default
        self.final_plan = plan | {"episodes": self.final_episodes, "seed": seed, "seeds_role": role}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.launched = time.monotonic()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.final_episodes > 0 and trainer.is_global_zero:
            self.final = self.final_evaluation(trainer, pl_module)

    def wall_time(self) -> float:
        """Seconds of fit (training and evaluations) over every launch of this run so far."""
        return self.elapsed + (time.monotonic() - self.launched if self.launched is not None else 0.0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if evaluation_due(trainer.global_step, self.every_n_steps, trainer.max_steps):
            self.evaluate(trainer, pl_module)

    def state_dict(self) -> dict:
        # selection_seeds: dtlab.evaluate warns when asked to report on them; final_evaluation:
        # what dtlab.evaluate repeats by default (episodes, seed, backend, workers, threads)
        return {
            "best": self.best,
            "selection_seeds": self.selection_seeds,
            "final_evaluation": self.final_plan,
            "run_id": self.run_id,
            "elapsed": self.wall_time(),
            "history": self.history,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = state_dict["best"]
        self.elapsed = state_dict.get("elapsed", 0.0)
        self.history = state_dict.get("history", [])
        self.run_id = state_dict.get("run_id") or self.run_id  # checkpoints before run ids: a new one

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict | None:
        """Roll out on rank 0 and log on every rank; returns the rollout result on rank 0.

        Under DDP every rank logs rank 0's numbers: ModelCheckpoint runs on all ranks, and a
        metric only rank 0 logged (rank_zero_only) would be missing on the others, so rank 0
        alone would save best.ckpt and wait in the checkpoint barrier forever."""
        result = self._rollout(trainer, pl_module) if trainer.is_global_zero else None
        metrics = trainer.strategy.broadcast(self._metrics(result) if result else None, src=0)
        self.best = max(self.best, metrics["eval/normalized_score"])
        metrics["eval/normalized_score_best"] = self.best
        # Straight to the loggers (they write on rank 0 only), once: pl_module.log from a
        # callback hook would repeat the values at every later logging step. callback_metrics
        # is what ModelCheckpoint (on every rank) and train()'s return value read.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        if result:
            self._log_media(trainer, result)
        self.last = result
        # an online run's env steps so far: the learning curve's other axis (dtlab.report)
        online = {k: float(v) for k, v in trainer.callback_metrics.items() if k == ONLINE_ENV_STEPS}
        self.history.append({"step": trainer.global_step, **metrics, **online})
        return result

    def final_evaluation(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        """last.ckpt and best.ckpt, each read back from its file, on the reporting seeds."""
        dataset_returns = getattr(trainer.datamodule, "episode_returns", None)
        targets = resolve_targets(self.target_return, dataset_returns, final=True)
        seed, role = final_seeds(self.report_seed, self.dev_seed)
        report = {"kind": "final_evaluation", "run_id": self.run_id, "checkpoints": {}}
        metrics = {}
        pretrained = ["pretrained"] if (self.checkpoints_dir / "pretrained.ckpt").is_file() else []
        for name in ("last", "best", *pretrained):
            path = self.checkpoints_dir / f"{name}.ckpt"
            if not path.is_file() and name == "last":
                # a run whose record lacks its last weights must not pass for a finished one
                raise DTLabError(
                    f"final evaluation: {path} does not exist (callbacks.checkpoint.save_last=false, or removed "
                    f"during the run): evaluate the run's checkpoints with python -m dtlab.evaluate ckpt_path=PATH"
                )
            if not path.is_file():
                log.warning("final evaluation: %s does not exist, skipped", path)
                continue
            saved = read_checkpoint(path)  # once: the module and its step from one read
            step = checkpoint_facts(saved)[0]
            try:
                result = rollout(
                    Policy.from_module(module_from_checkpoint(saved, pl_module.device)),
                    self.env,
                    targets,
                    self.final_episodes,
                    seed=seed,
                    vector_mode=self.vector_mode,
                    progress=trainer.progress_bar_callback is not None,
                    backend=self.backend,
                    workers=self.workers,
                )
            except NonFiniteRollout as e:
                raise DTLabError(f"final evaluation of {path}: {e}") from None
            record = protocol(
                self.env,
                targets,
                self.target_return,
                self.final_episodes,
                seed,
                str(path),
                step,
                role,
                ran=result["ran"],
            )
            report["checkpoints"][name] = evaluation_record(record, result)
            for s in result["summary"]:
                for key in ("return_mean", "return_std", "normalized_score"):
                    metrics[f"final/{name}/{s['target']:g}/{key}"] = s[key]
            metrics[f"final/{name}/step"] = step
            log.info(
                "final evaluation of %s.ckpt (step %d, %s seeds %d-%d, %d episodes per target): %s",
                name,
                step,
                role,
                *record["seeds"],
                self.final_episodes,
                ", ".join(
                    f"target {s['target']:g}: {s['return_mean']:.0f} ({s['normalized_score']:.1f})"
                    for s in result["summary"]
                ),
            )
        report |= {
            "steps": trainer.global_step,
            "wall_time_s": self.wall_time(),
            "data_returns": None  # the behaviour's episode returns
            if dataset_returns is None
            else {
                "min": float(np.min(dataset_returns)),
                "max": float(np.max(dataset_returns)),
                "mean": float(np.mean(dataset_returns)),
            },
            "history": self.history,
        }
        path = self.run_dir / "final_evaluation.json"
        path.write_text(json.dumps(report, indent=2))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in metrics.items()})
        return report

    def _rollout(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        dataset_returns = getattr(trainer.datamodule, "episode_returns", None)
        return rollout(
            Policy.from_module(pl_module),
            self.env,
            resolve_targets(self.target_return, dataset_returns),
            self.episodes,
            seed=self.seed,
            vector_mode=self.vector_mode,
            video_frames=self.video_frames if self.video else 0,
            progress=trainer.progress_bar_callback is not None,
            backend=self.backend,
            workers=self.workers,
        )

    @staticmethod
    def _metrics(result: dict) -> dict[str, float]:
        metrics = {}
        for s in result["summary"]:
            key = f"eval/{s['target']:g}"
            metrics |= {
                f"{key}/return_mean": s["return_mean"],
                f"{key}/return_std": s["return_std"],
                f"{key}/normalized_score": s["normalized_score"],
            }
        metrics["eval/normalized_score"] = max(s["normalized_score"] for s in result["summary"])
        return metrics

    def _log_media(self, trainer: L.Trainer, result: dict) -> None:
        """The log line, the plot and videos on disk, and media for the loggers that take them."""
        step = trainer.global_step
        summary = result["summary"]
        log.info(
            "step %d eval (current weights, selection seeds %d-%d): %s; max over targets %.1f",
            step,
            self.seed,
            self.seed + len(result["episodes"]) - 1,
            ", ".join(f"target {s['target']:g}: {s['return_mean']:.0f} ({s['normalized_score']:.1f})" for s in summary),
            max(s["normalized_score"] for s in summary),
        )
        dataset_returns = getattr(trainer.datamodule, "episode_returns", None)
        plot = plot_return_conditioning(
            result["episodes"], dataset_returns, self.output_dir / f"return_conditioning_step{step}.png", f"step {step}"
        )
        targets = [s["target"] for s in summary]
        videos = [
            write_video(frames, self.output_dir / f"video_target{target:g}_step{step}.mp4")
            for target, frames in zip(targets, result.get("frames", []), strict=False)
        ]
        # episodes are target-major, `self.episodes` per target
        columns = ["target", "episode", "seed", "return", "normalized_score", "length"]
        rows = [
            [e["target"], i % self.episodes, e["seed"], e["return"], e["normalized_score"], e["length"]]
            for i, e in enumerate(result["episodes"])
        ]
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image("eval/return_conditioning", images=[str(plot)], step=step)
            if videos and hasattr(logger, "log_video"):
                captions = [f"target {t:g}" for t in targets[: len(videos)]]
                logger.log_video(
                    "eval/video",
                    videos=[str(v) for v in videos],
                    step=step,
                    format=["mp4"] * len(videos),
                    caption=captions,
                )
            if hasattr(logger, "log_table"):
                logger.log_table("eval/episodes", columns=columns, data=rows, step=step)
