import pytest
import torch

from dtlab.model import DecisionTransformer, DTConfig

K, S, A = 8, 5, 3


def dt(**config) -> DecisionTransformer:
    torch.manual_seed(0)
    sizes = {"max_ep_len": 100, "context_length": K, "n_layer": 2, "n_head": 2, "n_embd": 32}
    return DecisionTransformer(DTConfig(state_dim=S, act_dim=A, **sizes | config)).eval()


@pytest.fixture
def model() -> DecisionTransformer:
    return dt()


def inputs(batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "states": torch.randn(batch, K, S, generator=g),
        "actions": torch.rand(batch, K, A, generator=g) * 2 - 1,
        "returns_to_go": torch.randn(batch, K, generator=g),
        "timesteps": torch.arange(10, 10 + K).repeat(batch, 1),
    }


def changed(model: DecisionTransformer, key: str, t: int) -> torch.Tensor:
    """Which steps' predicted actions change when input `key` at step t changes: (K,) bool."""
    x = inputs()
    before = model(**x)
    x[key] = x[key].clone()
    x[key][:, t] += 1.0
    after = model(**x)
    return (after - before).abs().amax(dim=(0, 2)) > 1e-6


@pytest.mark.parametrize("key", ["states", "actions", "returns_to_go"])
def test_causal_later_tokens_do_not_change_earlier_predictions(model, key):
    t = 4
    assert not changed(model, key, t)[:t].any()


def test_tokens_interleave_return_state_action(model):
    # a_t is predicted from s_t, which comes after R_t and s_t but before a_t ...
    t = 4
    assert changed(model, "returns_to_go", t)[t]
    assert changed(model, "states", t)[t]
    assert not changed(model, "actions", t)[t]
    # ... and after a_{t-1}. Blocks concatenated [R..., s..., a...] would fail one of these.
    assert changed(model, "actions", t - 1)[t]
    assert not changed(model, "returns_to_go", t + 1)[t]


@pytest.mark.parametrize("pad_value", [0.0, -10.0, 1e6, float("inf"), float("nan")])
def test_padding_never_changes_valid_outputs(model, pad_value):
    x, pad = inputs(), 3
    mask = torch.arange(K)[None].expand(2, K) >= pad
    reference = model(**{k: v[:, pad:] for k, v in x.items()})  # the unpadded shorter window
    padded = {k: v.clone() for k, v in x.items()}
    for k in ("states", "actions", "returns_to_go"):
        padded[k][:, :pad] = pad_value
    padded["timesteps"][:, :pad] = 99
    out = model(**padded, mask=mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, pad:], reference, atol=1e-5, rtol=1e-5)


def test_last_only_equals_full_forward(model):
    x = inputs()
    mask = torch.arange(K)[None].expand(2, K) >= torch.tensor([[0], [5]])
    torch.testing.assert_close(
        model(**x, mask=mask, last_only=True), model(**x, mask=mask)[:, -1], atol=1e-6, rtol=1e-5
    )


def test_actions_in_tanh_range(model):
    x = inputs()
    x["states"] *= 100
    assert model(**x).abs().max() <= 1.0


def test_weight_decay_only_on_linear_weights(model):
    decay, no_decay = model.parameter_groups(0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(n.endswith("weight") and "ln" not in n and "embed_timestep" not in n for n in decayed)
    assert "embed_state.weight" in decayed and "h.0.attn.c_attn.weight" in decayed
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert {"embed_timestep.weight", "embed_ln.weight", "h.0.ln_1.weight", "embed_state.bias"} <= not_decayed
    assert len(decayed) + len(not_decayed) == len(list(model.parameters()))


def test_without_a_timestep_table_timesteps_change_nothing():
    model = dt(timestep_embedding=False)
    assert model.embed_timestep is None and not any("timestep" in n for n, _ in model.named_parameters())
    x = inputs()
    later = {**x, "timesteps": x["timesteps"] + 50}
    assert torch.equal(model(**x), model(**later))
    assert not torch.equal(dt()(**x), dt()(**later))  # the paper's model reads them


@pytest.mark.parametrize("return_init, reads_return", [("gpt2", False), ("torch", True)])
def test_return_init_decides_whether_a_model_without_timesteps_starts_blind_to_its_return(return_init, reads_return):
    # LayerNorm(w R + b) is one vector for every R > 0 when b = 0 (GPT-2's bias init), so with
    # nothing else added to the return token the untrained model's actions ignore R
    model = dt(timestep_embedding=False, return_init=return_init)
    x = inputs()
    x["returns_to_go"] = x["returns_to_go"].abs() + 0.1
    higher = {**x, "returns_to_go": x["returns_to_go"] * 3}
    moved = (model(**x) - model(**higher)).abs().max().item()
    assert (moved > 1e-4) == reads_return, moved


def test_an_unknown_return_init_is_refused():
    with pytest.raises(ValueError, match="return_init='xavier' is unknown"):
        dt(return_init="xavier")


def _uniform_in_fan_in_bound(p: torch.Tensor, fan_in: int) -> bool:
    # PyTorch's nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std bound / sqrt(3)
    bound = fan_in**-0.5
    return p.abs().max() <= bound and abs(p.std().item() - bound / 3**0.5) < 0.25 * bound


@pytest.mark.parametrize("head", ["deterministic", "gaussian"])
def test_reference_init_follows_the_reference_code_layer_by_layer(head):
    # kzl/decision-transformer: GPT2Model.init_weights() reaches only the transformer's own
    # modules (N(0, 0.02), biases 0, LayerNorm 1/0, no residual scaling in its GPT-2 copy); the
    # embeddings and heads are made outside it and keep PyTorch's defaults
    sizes = {"max_ep_len": 1000, "context_length": K, "n_layer": 3, "n_head": 1, "n_embd": 128}
    model = DecisionTransformer(DTConfig(state_dim=17, act_dim=6, init="reference", action_head=head, **sizes))
    assert abs(model.embed_timestep.weight.std().item() - 1.0) < 0.02  # nn.Embedding: N(0, 1)
    assert abs(model.embed_timestep.weight.mean().item()) < 0.02
    heads = {"embed_return": 1, "embed_state": 17, "embed_action": 6, "predict_action": 128}
    if head == "gaussian":
        heads["predict_log_std"] = 128
    for name, fan_in in heads.items():
        layer = getattr(model, name)
        assert _uniform_in_fan_in_bound(layer.weight, fan_in), name
        assert layer.bias.abs().max() <= fan_in**-0.5 and layer.bias.abs().min() > 0, name  # not zeroed
    for name, p in model.h.named_parameters():
        if "ln_" in name:
            assert torch.all(p == (1.0 if name.endswith("weight") else 0.0)), name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        else:  # c_attn, c_fc and both c_proj alike: the reference's GPT-2 does not scale c_proj
            assert abs(p.std().item() - 0.02) < 0.002, (name, p.std().item())
    for ln in (model.embed_ln, model.ln_f):
        assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)


def test_gpt2_init_is_transformers_rule_on_every_layer():
    model = dt(init="gpt2", n_layer=3, n_embd=128, max_ep_len=1000)
    for name, p in model.named_parameters():
        if "ln" in name:
            continue
        if name.endswith("bias"):
            assert torch.all(p == 0), name
        elif name.endswith("c_proj.weight"):
            assert abs(p.std().item() - 0.02 / 6**0.5) < 0.001, name
        elif p.numel() > 1000:  # embed_return's 128 weights: too few for a close std
            assert abs(p.std().item() - 0.02) < 0.002, (name, p.std().item())


@pytest.mark.parametrize("timesteps", [True, False])
def test_reference_init_reads_the_return_more_from_the_start(timesteps):
    # what the init is for: with GPT-2's rule the return token LayerNorm(w R + b + e_t) is nearly
    # one vector for every R > 0 (exactly one without a table: b = 0); with the reference's the
    # untrained model's actions move with R several times more (3-7x with the table, seeds 0-4)
    x = inputs()
    x["returns_to_go"] = x["returns_to_go"].abs() + 0.1
    higher = {**x, "returns_to_go": x["returns_to_go"] * 3}
    moved = {}
    for init in ("gpt2", "reference"):
        model = dt(init=init, n_layer=3, n_head=1, n_embd=128, timestep_embedding=timesteps)
        moved[init] = (model(**x) - model(**higher)).abs().max().item()
    assert moved["reference"] > 1e-3 and moved["reference"] > 2 * moved["gpt2"], moved
    if not timesteps:
        assert moved["gpt2"] < 1e-4, moved


def test_an_unknown_init_is_refused():
    with pytest.raises(ValueError, match="init='xavier' is unknown"):
        dt(init="xavier")
