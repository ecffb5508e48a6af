"""Training throughput: the HF tutorial's stack against dtlab's, same model size, same data.

    python benchmarks/train_throughput.py --data halfcheetah-medium-v5.parquet

In one process, the paper's model size (3 layers, 128 dims, 1 head), batch 64, K 20:
  (a) baseline: `transformers.DecisionTransformerModel` fed by a collator that indexes rows of
      the HF dataset one sample at a time in Python (as the HF tutorial's collator does), in a
      plain PyTorch loop (AdamW, grad clip 0.25);
  (b) dtlab: TrajectoryDataModule and DTModule under the Lightning Trainer.
Prints samples/s of both and the ratio, the share of (b)'s step time spent getting batches,
and (b)'s model FLOP/s as a fraction of this CPU's fp32 matmul peak measured here; writes
benchmarks/results/train_throughput.json. Needs `pip install transformers` (benchmark only).
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import datasets
import lightning as L
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from dtlab.data import load_episodes, load_local
from dtlab.datamodule import TrajectoryDataModule
from dtlab.module import DTModule

BATCH, K, OBS, ACT, MAX_EP_LEN, SCALE = 64, 20, 17, 6, 1000, 0.001


class TutorialCollator:
    """The tutorial's way: per sample, pick an episode (p ~ length), read its row from the HF
    dataset, slice a window, compute its returns-to-go, pad it, and stack the batch."""

    def __init__(self, ds: datasets.Dataset, seed: int) -> None:
        self.ds = ds
        lengths = np.array([len(r) for r in ds["rewards"]])
        self.p = lengths / lengths.sum()
        states = np.concatenate([np.asarray(o, dtype=np.float32) for o in ds["observations"]])
        self.mean, self.std = states.mean(0), states.std(0) + 1e-6
        self.rng = np.random.default_rng(seed)

    def __call__(self, batch_size: int) -> dict[str, torch.Tensor]:
        s, a, rtg, t, m = [], [], [], [], []
        for e in self.rng.choice(len(self.p), size=batch_size, p=self.p):
            row = self.ds[int(e)]
            start = int(self.rng.integers(len(row["rewards"])))
            obs = np.asarray(row["observations"][start : start + K], dtype=np.float32)
            n, pad = len(obs), K - len(obs)
            rewards = np.asarray(row["rewards"][start:], dtype=np.float64)
            to_go = np.cumsum(rewards[::-1])[::-1][:n] * SCALE
            s.append(np.concatenate([np.zeros((pad, OBS)), (obs - self.mean) / self.std]))
            a.append(np.concatenate([np.full((pad, ACT), -10.0), np.asarray(row["actions"][start : start + n])]))
            rtg.append(np.concatenate([np.zeros(pad), to_go])[:, None])
            t.append(np.concatenate([np.zeros(pad), np.arange(start, start + n)]))
            m.append(np.concatenate([np.zeros(pad), np.ones(n)]))
        return {
            "states": torch.tensor(np.array(s), dtype=torch.float32),
            "actions": torch.tensor(np.array(a), dtype=torch.float32),
            "returns_to_go": torch.tensor(np.array(rtg), dtype=torch.float32),
            "timesteps": torch.tensor(np.array(t), dtype=torch.long).clamp(max=MAX_EP_LEN - 1),
            "attention_mask": torch.tensor(np.array(m), dtype=torch.long),
        }


def baseline(path: str, steps: int, warmup: int, seed: int) -> float:
    """Samples/s of (a)."""
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    torch.manual_seed(seed)
    config = DecisionTransformerConfig(
        state_dim=OBS, act_dim=ACT, hidden_size=128, n_layer=3, n_head=1, max_ep_len=MAX_EP_LEN, action_tanh=True
    )
    model = DecisionTransformerModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    collate = TutorialCollator(datasets.Dataset.from_parquet(path), seed)

    def step() -> None:
        batch = collate(BATCH)
        out = model(
            states=batch["states"],
            actions=batch["actions"],
            rewards=torch.zeros_like(batch["returns_to_go"]),
            returns_to_go=batch["returns_to_go"],
            timesteps=batch["timesteps"],
            attention_mask=batch["attention_mask"],
        )
        mask = batch["attention_mask"].bool()
        loss = ((out.action_preds - batch["actions"]) ** 2)[mask].mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        optimizer.step()

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * BATCH / (time.perf_counter() - start)


class StepTimer(L.Callback):
    """Wall time of the steps after `warmup` (CUDA synchronised where there is CUDA, so that
    queued kernels count)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.warmup:
            self.start = self._now()

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step >= trainer.max_steps:
            self.end = self._now()


def timed_fit(
    module: L.LightningModule, datamodule: L.LightningDataModule, steps: int, warmup: int, **trainer
) -> float:
    """Seconds that `steps` training steps took after `warmup` more, under the Trainer as
    dtlab.train runs it (gradient clipping) with no logging, checkpoints or validation.
    `trainer`: more Trainer arguments (accelerator, devices, precision)."""
    timer = StepTimer(warmup)
    L.Trainer(
        max_steps=warmup + steps,
        gradient_clip_val=0.25,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer],
        **trainer,
    ).fit(module, datamodule=datamodule)
    return timer.end - timer.start


def dtlab_run(path: str, steps: int, warmup: int, seed: int) -> dict:
    """Samples/s of (b), the time to draw its batches alone, and its FLOPs per step."""
    L.seed_everything(seed, verbose=False)
    dm = TrajectoryDataModule(
        load_episodes(partial(load_local, path), OBS, ACT), MAX_EP_LEN, K, BATCH, SCALE, val_fraction=0.0
    )
    dm.setup()
    module = DTModule("HalfCheetah-v5", OBS, ACT, MAX_EP_LEN, dm.state_mean.tolist(), dm.state_std.tolist(), SCALE)
    samples_per_s = steps * BATCH / timed_fit(module, dm, steps, warmup, accelerator="cpu")

    start = time.perf_counter()
    for step in range(steps):  # the loader yields step numbers; the data module draws their batches
        dm.batch_at(step)
    data_s_per_step = (time.perf_counter() - start) / steps

    batch = dm.batch_at(steps)
    with FlopCounterMode(display=False) as counter:
        module._action_mse(batch).backward()
    return {
        "samples_per_s": samples_per_s,
        "data_time_share": data_s_per_step / (BATCH / samples_per_s),
        "flops_per_step": counter.get_total_flops(),
    }


def matmul_peak(n: int = 2048, repeats: int = 20) -> float:
    """fp32 FLOP/s of a large square matmul: this CPU's practical peak with these threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a Parquet file in the hub's schema")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_throughput.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base = baseline(args.data, args.steps, args.warmup, args.seed)
    ours = dtlab_run(args.data, args.steps, args.warmup, args.seed)
    peak = matmul_peak()
    achieved = ours["flops_per_step"] * ours["samples_per_s"] / BATCH
    report = {
        "baseline_samples_per_s": base,
        "dtlab_samples_per_s": ours["samples_per_s"],
        "speedup": ours["samples_per_s"] / base,
        "data_time_share": ours["data_time_share"],
        "peak_fraction": achieved / peak,
        "model_flops_per_s": achieved,
        "matmul_peak_flops_per_s": peak,
        "flops_per_step": ours["flops_per_step"],
        "setup": {
            "data": args.data,
            "steps": args.steps,
            "batch": BATCH,
            "K": K,
            "torch_threads": torch.get_num_threads(),
        },
    }
    print(f"{'stack':46} {'samples/s':>10}")
    print(f"{'(a) transformers DT + per-sample collator':46} {base:>10.0f}")
    print(f"{'(b) dtlab DataModule + DTModule + Trainer':46} {ours['samples_per_s']:>10.0f}")
    print(f"speed-up (b)/(a): {report['speedup']:.2f}x; (b) time getting batches: {ours['data_time_share']:.1%}")
    print(
        f"(b) model: {achieved / 1e9:.1f} GFLOP/s = {report['peak_fraction']:.1%} "
        f"of the fp32 matmul peak ({peak / 1e9:.0f} GFLOP/s)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
