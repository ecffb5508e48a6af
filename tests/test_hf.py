"""transformers interop: imported and exported models predict the same actions as transformers'."""

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
from transformers import DecisionTransformerConfig, DecisionTransformerModel  # noqa: E402

from dtlab import DTLabError  # noqa: E402
from dtlab.evaluate import evaluate  # noqa: E402
from dtlab.hf import from_transformers, to_transformers, transformers_actions  # noqa: E402
from dtlab.model import DecisionTransformer, DTConfig  # noqa: E402
from dtlab.module import DTModule  # noqa: E402

B, K, STATE, ACT, MAX_EP_LEN = 4, 20, 17, 6, 1000
PADS = [0, 3, 12, 19]  # left padding per window: none, some, most, all but one step
TOL = 1e-5


def random_transformers_model(**config) -> DecisionTransformerModel:
    """The paper's size (3 layers, 128 dims, K=20 windows), every parameter moved off its
    initial value so that no weight is left at a trivial 0 or 1 that a wrong mapping could hide."""
    torch.manual_seed(0)
    config = {"state_dim": STATE, "act_dim": ACT, "max_ep_len": MAX_EP_LEN, "n_layer": 3, "hidden_size": 128} | config
    model = DecisionTransformerModel(DecisionTransformerConfig(**config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def windows() -> tuple[torch.Tensor, ...]:
    """Left-padded windows in dtlab's convention, with junk at the padded steps (transformers
    does not zero them; only the valid steps are compared)."""
    g = torch.Generator().manual_seed(1)
    states = torch.randn(B, K, STATE, generator=g)
    actions = torch.rand(B, K, ACT, generator=g) * 2 - 1
    returns_to_go = torch.randn(B, K, generator=g) * 3
    timesteps = torch.randint(0, MAX_EP_LEN - K, (B, 1), generator=g) + torch.arange(K)
    mask = torch.arange(K) >= torch.tensor(PADS)[:, None]
    states[~mask] = 1e3
    returns_to_go[~mask] = -1e3
    return states, actions, returns_to_go, timesteps, mask


@torch.no_grad()
def max_action_diff(hf: DecisionTransformerModel, model: torch.nn.Module) -> float:
    """Max abs difference of the actions predicted at valid steps, and at the last step alone."""
    inputs, mask = windows(), windows()[-1]
    theirs = transformers_actions(hf.eval(), *inputs)
    ours = model.eval()(*inputs)
    last = model(*inputs, last_only=True)
    return max((theirs - ours)[mask].abs().max().item(), (theirs[:, -1] - last).abs().max().item())


@pytest.mark.parametrize("activation", ["relu", "gelu_new", "gelu"])
@pytest.mark.parametrize("n_head", [1, 4])
def test_import_predicts_transformers_actions_and_export_reloads_the_same(tmp_path, activation, n_head):
    hf = random_transformers_model(activation_function=activation, n_head=n_head)
    imported = from_transformers(hf)
    assert imported.model.config.context_length == K and imported.state_mean is None
    assert max_action_diff(hf, imported.model) <= TOL

    to_transformers(imported.model, tmp_path)
    reloaded = DecisionTransformerModel.from_pretrained(tmp_path)
    assert reloaded.config.activation_function in (activation, "gelu_new")  # gelu_pytorch_tanh exports as gelu_new
    assert not reloaded.encoder.wpe.weight.any()  # the position table was folded into embed_ln
    assert max_action_diff(reloaded, imported.model) <= TOL
    assert max_action_diff(hf, from_transformers(tmp_path).model) <= TOL


def test_a_model_without_a_timestep_table_exports_with_a_table_of_zeros(tmp_path):
    model = DecisionTransformer(
        DTConfig(state_dim=STATE, act_dim=ACT, max_ep_len=MAX_EP_LEN, context_length=K, timestep_embedding=False)
    ).eval()
    hf = to_transformers(model)
    assert not hf.embed_timestep.weight.any()
    assert max_action_diff(hf, model) <= TOL


def test_module_round_trip_keeps_normalization_env_and_k(tmp_path):
    torch.manual_seed(2)
    mean, std = torch.randn(STATE).tolist(), (torch.rand(STATE) + 0.5).tolist()
    module = DTModule("HalfCheetah-v5", STATE, ACT, MAX_EP_LEN, mean, std, reward_scale=0.001, context_length=K)
    to_transformers(module, tmp_path)
    imported = from_transformers(tmp_path)
    assert imported.env_id == "HalfCheetah-v5" and imported.reward_scale == 0.001
    assert imported.state_mean == module.state_mean.tolist() and imported.state_std == module.state_std.tolist()
    assert imported.model.config == module.model.config
    assert max_action_diff(DecisionTransformerModel.from_pretrained(tmp_path), module.model) <= TOL
    policy = imported.policy()
    assert torch.equal(policy.state_mean, module.state_mean) and policy.reward_scale == 0.001


def test_a_folder_without_normalization_says_what_to_write(tmp_path):
    random_transformers_model().save_pretrained(tmp_path)
    imported = from_transformers(tmp_path, context_length=10)
    assert imported.model.config.context_length == 10
    with pytest.raises(DTLabError, match="no dtlab.json with state_mean, state_std"):
        imported.policy(str(tmp_path))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"activation_function": "silu"}, "activation_function='silu'"),
        ({"n_inner": 256}, "n_inner=256"),
    ],
)
def test_settings_dtlab_cannot_represent_are_refused(config, message):
    with pytest.raises(DTLabError, match=message):
        from_transformers(random_transformers_model(**config))


def test_not_a_save_pretrained_folder(tmp_path):
    with pytest.raises(DTLabError, match="not a save_pretrained folder"):
        from_transformers(tmp_path)


def test_missing_transformers_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed: import raises ImportError
    with pytest.raises(DTLabError, match=r"pip install 'dtlab\[hf\]'"):
        to_transformers(DTModule("HalfCheetah-v5", STATE, ACT, MAX_EP_LEN, [0.0] * STATE, [1.0] * STATE, 0.001))


@pytest.fixture
def exported(tmp_path):
    """A fresh HalfCheetah DTModule exported to a transformers folder, with its dtlab.json."""
    torch.manual_seed(3)
    module = DTModule("HalfCheetah-v5", STATE, ACT, MAX_EP_LEN, [0.0] * STATE, [1.0] * STATE, 0.001, context_length=K)
    to_transformers(module, tmp_path / "hf")
    return tmp_path / "hf"


def test_evaluate_command_runs_a_transformers_folder(exported, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "dtlab.evaluate",
        f"hf_model={exported}",
        "env=halfcheetah",
        "env.max_episode_steps=30",
        "target_return=custom",
        "target_return.values=[0,500]",
        "eval.episodes=2",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert report["hf_model"] == str(exported.resolve()) and report["env_id"] == "HalfCheetah-v5"
    assert [e["length"] for e in report["episodes"]] == [30] * 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "does not say its env config: choose one with env="),
        (["env=hopper"], "hf_model was trained in HalfCheetah-v5 but env=Hopper-v5 was asked"),
        (["env=halfcheetah", "ckpt_path=x.ckpt"], "give one of ckpt_path=PATH"),
    ],
)
def test_evaluate_refuses_what_a_transformers_folder_cannot_tell(exported, make_cfg, args, message):
    with pytest.raises(DTLabError, match=message):
        evaluate(make_cfg(f"hf_model={exported}", *args, config="evaluate"))


def test_evaluate_needs_the_normalization(tmp_path, make_cfg):
    random_transformers_model().save_pretrained(tmp_path / "hf")
    with pytest.raises(DTLabError, match="no dtlab.json"):
        evaluate(make_cfg(f"hf_model={tmp_path / 'hf'}", "env=halfcheetah", config="evaluate"))


def test_an_imported_relu_model_fine_tunes_through_dtmodule(tmp_path):
    import lightning as L
    import numpy as np

    from dtlab.data import episodes_from_dataset, episodes_to_dataset
    from dtlab.datamodule import TrajectoryDataModule

    hf = random_transformers_model(activation_function="relu")
    imported = from_transformers(hf)
    mean, std = [0.0] * STATE, [1.0] * STATE
    module = imported.module(env_id="HalfCheetah-v5", state_mean=mean, state_std=std, reward_scale=0.001)
    assert module.hparams.activation == "relu" and module.hparams.max_ep_len == MAX_EP_LEN
    assert max_action_diff(hf, module.model) <= TOL  # the same function before training
    rng = np.random.default_rng(0)
    n = 3 * 40
    data = episodes_to_dataset(
        rng.normal(size=(n, STATE)), rng.uniform(-1, 1, (n, ACT)), rng.normal(size=n), np.zeros(n, bool), [40] * 3
    )
    datamodule = TrajectoryDataModule(episodes_from_dataset(data), MAX_EP_LEN, K, batch_size=4, val_fraction=0)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, datamodule=datamodule)
    assert any(not torch.equal(before[k], v) for k, v in module.model.state_dict().items())
    trainer.save_checkpoint(tmp_path / "tuned.ckpt")
    tuned = DTModule.load_from_checkpoint(tmp_path / "tuned.ckpt")
    assert isinstance(tuned.model.h[0].mlp.act, torch.nn.ReLU)
    with pytest.raises(DTLabError, match=r"\['activation'\] are the imported model's own"):
        imported.module(env_id="x", state_mean=mean, state_std=std, reward_scale=0.001, activation="gelu")


def test_a_hub_checkpoint_without_dtlab_json_evaluates_with_the_tutorials_normalization(tmp_path, make_cfg):
    import numpy as np
    from datasets import Dataset

    from dtlab.data import SAMPLE_PATH
    from dtlab.evaluate import load_policy

    random_transformers_model().save_pretrained(tmp_path / "hf")
    args = [f"hf_model={tmp_path / 'hf'}", "dataset=sample", "env=halfcheetah", "env.max_episode_steps=20"]
    policy, _ = load_policy(make_cfg(*args, config="evaluate"))
    # the HF tutorial's: mean and std over every step of the data, std + 1e-6; scale=1000
    steps = np.concatenate(
        [np.asarray(o, dtype=np.float64) for o in Dataset.from_parquet(str(SAMPLE_PATH))["observations"]]
    )
    np.testing.assert_allclose(policy.state_mean.numpy(), steps.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(policy.state_std.numpy(), steps.std(0) + 1e-6, rtol=1e-4)
    assert policy.reward_scale == 0.001
    report = evaluate(make_cfg(*args, "eval.final_episodes=1", "eval.backend=eager", config="evaluate"))
    assert len(report["episodes"]) == 2 and all(e["length"] == 20 for e in report["episodes"])
