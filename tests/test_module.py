"""PolicyModule: the loss over real steps only, random streams apart, each parameter group's
learning-rate schedule."""

import lightning as L
import numpy as np
import pytest
import torch

from dtlab import DTLabError
from dtlab.data import BATCHES, WindowSampler, episodes_from_dataset, episodes_to_dataset, stream_seed
from dtlab.module import DTModule


def module(policy: str = "dt", n_layer: int = 1, **options) -> DTModule:
    torch.manual_seed(0)
    return DTModule(
        env_id="HalfCheetah-v5",
        state_dim=3,
        act_dim=2,
        max_ep_len=100,
        state_mean=[0.0] * 3,
        state_std=[1.0] * 3,
        reward_scale=0.001,
        context_length=6,
        n_layer=n_layer,
        n_embd=16,
        dropout=0.0,
        policy=policy,
        **options,
    )


def padded_batch() -> dict[str, torch.Tensor]:
    """Windows from episodes of 2 and 3 steps with K=6: every window is padded."""
    rng = np.random.default_rng(0)
    lengths = np.array([2, 3])
    n = lengths.sum()
    dataset = episodes_to_dataset(
        rng.normal(size=(n, 3)), rng.uniform(-1, 1, (n, 2)), rng.normal(size=n), np.zeros(n, bool), lengths
    )
    sampler = WindowSampler(episodes_from_dataset(dataset), 6, 0.001, np.zeros(3), np.ones(3), max_ep_len=100)
    return sampler.windows(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]))


def test_pads_are_excluded_from_the_loss():
    dt, batch = module(), padded_batch()
    assert (~batch["mask"]).sum() == 4 + 3 + 4
    loss = dt._action_mse(batch)
    # a pad's action target is anything at all: the loss must not move
    wild = {**batch, "actions": batch["actions"].masked_fill(~batch["mask"][..., None], 50.0)}
    assert torch.equal(dt._action_mse(wild), loss)
    # and it is the mean over the 7 real steps, each the mean over action dims
    pred = dt.model(batch["states"], batch["actions"], batch["returns_to_go"], batch["timesteps"], batch["mask"])
    real = batch["mask"]
    expected = ((pred[real] - batch["actions"][real]) ** 2).mean(dim=1).mean()
    torch.testing.assert_close(loss, expected)


def test_dropout_masks_are_not_a_function_of_the_batch_draw():
    dt = module()
    dt.hparams.seed = 7
    dt.on_train_batch_start(None, 0)  # seeds dropout for step 0 of rank 0
    dropout_draw = torch.rand(8)
    batch_draw = torch.rand(8, generator=torch.Generator().manual_seed(stream_seed(7, 0, 0, BATCHES)))
    assert not torch.equal(dropout_draw, batch_draw)
    dt.on_train_batch_start(None, 0)  # and the same step draws the same masks again (resume)
    assert torch.equal(torch.rand(8), dropout_draw)


def test_bc_ignores_returns_to_go_and_past_actions_and_dt_does_not():
    batch = padded_batch()
    changed = {
        **batch,
        "returns_to_go": batch["returns_to_go"] + 3.0,
        "actions": torch.roll(batch["actions"], 1, dims=1).masked_fill(~batch["mask"][..., None], 0.0),
    }
    outputs = {}
    for policy in ("dt", "mlp_bc"):
        dt = module(policy, n_layer=2)
        dt.eval()
        with torch.no_grad():
            outputs[policy] = [
                dt.model(b["states"], b["actions"], b["returns_to_go"], b["timesteps"], b["mask"], last_only=True)
                for b in (batch, changed)
            ]
    assert torch.equal(*outputs["mlp_bc"])
    assert not torch.allclose(*outputs["dt"], atol=1e-4)


def test_the_model_options_reach_the_network():
    assert module().model.embed_timestep is not None  # the paper's table by default
    bare = module(timestep_embedding=False, return_init="torch")
    assert bare.model.embed_timestep is None and bare.model.config.return_init == "torch"
    with pytest.raises(DTLabError, match="return_init='xavier' is unknown"):
        module(return_init="xavier")


def test_bc_trains_only_where_its_k_state_input_is_the_episodes_own():
    # one episode of 20 steps, K=6: windows from its first step, from mid-episode, and one cut
    # at its end (left-padded by the window builder, its earlier states cut off)
    rng = np.random.default_rng(0)
    dataset = episodes_to_dataset(
        rng.normal(size=(20, 3)), rng.uniform(-1, 1, (20, 2)), rng.normal(size=20), np.zeros(20, bool), np.array([20])
    )
    sampler = WindowSampler(episodes_from_dataset(dataset), 6, 0.001, np.zeros(3), np.ones(3), max_ep_len=100)
    batch = sampler.windows(torch.zeros(3, dtype=torch.long), torch.tensor([0, 5, 17]))
    bc, dt = module("mlp_bc"), module("dt")
    trained = bc.model.trained_positions(batch["timesteps"], batch["mask"])
    assert trained[0].all()  # from step 0: zeros before it are what the rollout feeds at step 0
    assert trained[1].tolist() == [False] * 5 + [True]  # mid-episode: only the last has 6 real states
    assert not trained[2].any()  # cut at the end: steps 17-19 would read zeros for steps 12-16
    assert torch.equal(dt.model.trained_positions(batch["timesteps"], batch["mask"]), batch["mask"])  # the DT: all
    # the loss reads the trained positions only: any target elsewhere leaves it where it was
    wild = {**batch, "actions": batch["actions"].masked_fill(~trained[..., None], 50.0)}
    assert torch.equal(bc._action_mse(wild), bc._action_mse(batch))
    assert not torch.equal(dt._action_mse(wild), dt._action_mse(batch))


@pytest.mark.parametrize("action_head", ["deterministic", "gaussian"])
def test_every_parameter_group_gets_the_schedule_its_name_says(monkeypatch, action_head):
    m = module(warmup_steps=10, action_head=action_head)
    decay, no_decay = m.model.parameter_groups(0.1)
    # a policy with three groups: each must warm up like the others, however many there are
    half = len(decay["params"]) // 2
    three = [decay | {"params": decay["params"][:half]}, decay | {"name": "more", "params": decay["params"][half:]}]
    monkeypatch.setattr(m.model, "parameter_groups", lambda weight_decay: [*three, no_decay])
    m.trainer = L.Trainer(max_steps=100, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    configured = m.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    rates = {g.get("name"): g["lr"] for g in optimizer.param_groups}
    policy = {k: v for k, v in rates.items() if k != "temperature"}
    assert policy == pytest.approx({"decay": 1e-4 * 5 / 10, "more": 1e-4 * 5 / 10, "no_decay": 1e-4 * 5 / 10})
    if action_head == "gaussian":  # the temperature's own rate, constant
        assert rates["temperature"] == m.hparams.temperature_lr
