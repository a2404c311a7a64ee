"""Tests of dropkey.inference.monte_carlo_predict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dropkey.functional import dropkey_attention
from dropkey.inference import is_stochastic_module, monte_carlo_predict


class ToyDropKey(nn.Module):
    """A minimal DropKey attention layer (tokens attend to tokens) with a drop_ratio attribute."""

    def __init__(self, dim: int, drop_ratio: float) -> None:
        super().__init__()
        self.drop_ratio = drop_ratio
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = nn.LayerNorm(dim)
        self.seen_modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_modes.append(self.training)
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        return x + dropkey_attention(q, k, v, self.drop_ratio, training=self.training, all_dropped="zero")


class Recorder(nn.BatchNorm1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = self.training
        return super().forward(x)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = ToyDropKey(8, 0.5)
        self.bn = Recorder(8)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attn(x).mean(dim=1)
        return self.head(self.drop(self.bn(h)))


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = Toy()
    model.bn.running_mean.normal_()
    x = torch.randn(5, 6, 8)
    return model, x


@pytest.mark.parametrize("start_training", [True, False])
def test_modes_are_set_and_restored(start_training):
    model, x = _setup()
    model.train(start_training)
    model.attn.norm.train(not start_training)  # an odd mix must come back as it was
    before = {name: m.training for name, m in model.named_modules()}
    stats = model.bn.running_mean.clone()
    monte_carlo_predict(model, x, 3, generator=0)
    assert {name: m.training for name, m in model.named_modules()} == before
    assert model.attn.seen_modes[-3:] == [True, True, True]
    assert model.bn.seen is False  # BatchNorm ran in eval mode ...
    assert torch.equal(model.bn.running_mean, stats)  # ... and its statistics were not updated


def test_modes_restored_after_an_error():
    model, x = _setup()
    model.train()
    with pytest.raises(RuntimeError):
        monte_carlo_predict(model, x[..., :3], 2)
    assert all(m.training for m in model.modules())


def test_average_of_probabilities_and_logits():
    model, x = _setup()
    k = 4
    probs = monte_carlo_predict(model, x, k, average="probabilities", generator=11)
    logits = monte_carlo_predict(model, x, k, average="logits", generator=11)
    assert probs.shape == logits.shape == (5, 4)
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))
    # manual replay with the same seeding
    model.eval()
    model.attn.training = model.drop.training = True
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(11)
        samples = [model(x) for _ in range(k)]
    model.eval()
    torch.testing.assert_close(logits, torch.stack(samples).mean(0))
    torch.testing.assert_close(probs, torch.stack([s.softmax(-1) for s in samples]).mean(0))
    assert not torch.allclose(samples[0], samples[1])  # the passes really are stochastic


def test_reproducible_and_global_rng_untouched():
    model, x = _setup()
    state = torch.get_rng_state()
    a = monte_carlo_predict(model, x, 3, generator=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, monte_carlo_predict(model, x, 3, generator=5))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(monte_carlo_predict(model, x, 3, generator=g1), monte_carlo_predict(model, x, 3, generator=g2))
    assert not torch.equal(a, monte_carlo_predict(model, x, 3, generator=6))


def _seeded_vit():
    """A real dropkey ViT whose attention layers own their mask generators (mask_seed)."""
    from dropkey.models import create_model

    torch.manual_seed(0)
    model = create_model("vit_tiny_8", attn_variant="dropkey", drop_ratio=0.5, mask_seed=3)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    return model, x


@pytest.mark.parametrize("seed", [5, "generator"])
def test_reproducible_for_models_with_their_own_mask_generators(seed):
    model, x = _seeded_vit()
    assert all(attn.owns_generator for attn in model.attention_modules)
    make = (lambda: torch.Generator().manual_seed(5)) if seed == "generator" else (lambda: 5)
    model.train()(x)  # the training stream has started: the module generators exist and moved on
    a = monte_carlo_predict(model, x, 3, generator=make())
    b = monte_carlo_predict(model, x, 3, generator=make())
    assert torch.equal(a, b)
    assert not torch.equal(a, monte_carlo_predict(model, x, 3, generator=6))
    # and the passes are really stochastic (DropKey acts): K = 1 passes differ between seeds
    assert not torch.equal(monte_carlo_predict(model, x, 1, generator=1), monte_carlo_predict(model, x, 1, generator=2))


def test_seeded_passes_leave_the_modules_training_stream_as_it_was():
    model, x = _seeded_vit()
    twin, _ = _seeded_vit()
    model.train(), twin.train()
    assert torch.equal(model(x), twin(x))  # both streams started, in step
    states = [attn.generator.get_state() for attn in model.attention_modules]
    generators = [attn.generator for attn in model.attention_modules]
    monte_carlo_predict(model, x, 3, generator=5)
    assert [attn.generator for attn in model.attention_modules] == generators  # the same objects ...
    assert all(torch.equal(a.generator.get_state(), s) for a, s in zip(model.attention_modules, states, strict=True))
    assert all(attn._seed == 3 + i for i, attn in enumerate(model.attention_modules))  # ... and seeds
    assert model.training and all(m.training for m in model.modules())
    # the next training steps draw exactly the masks the twin (never MC-evaluated) draws
    torch.manual_seed(9)
    after = model(x)
    torch.manual_seed(9)
    assert torch.equal(after, twin(x))


def test_unseeded_passes_draw_from_the_module_generators():
    model, x = _seeded_vit()
    before = [attn.generator for attn in model.attention_modules]
    monte_carlo_predict(model, x, 2)
    assert all(attn.generator is not None for attn in model.attention_modules)  # created and used
    assert before == [None] * len(before)


def test_deterministic_model_gives_one_pass(caplog):
    model = nn.Sequential(nn.Linear(3, 2))
    x = torch.randn(4, 3)
    with caplog.at_level("WARNING"):
        out = monte_carlo_predict(model, x, 3, average="logits")
    assert "no stochastic module" in caplog.text
    torch.testing.assert_close(out, model(x).detach())


def test_stochastic_module_detection():
    assert is_stochastic_module(nn.Dropout(0.1)) and is_stochastic_module(nn.Dropout2d(0.1))
    assert is_stochastic_module(ToyDropKey(4, 0.1))
    assert not is_stochastic_module(nn.BatchNorm1d(3)) and not is_stochastic_module(nn.Linear(2, 2))


def test_invalid_arguments():
    model, x = _setup()
    with pytest.raises(ValueError, match="num_samples"):
        monte_carlo_predict(model, x, 0)
    with pytest.raises(ValueError, match="num_samples"):
        monte_carlo_predict(model, x, 2.5)
    with pytest.raises(ValueError, match="average"):
        monte_carlo_predict(model, x, 2, average="median")
    with pytest.raises(ValueError, match="model"):
        monte_carlo_predict(lambda t: t, x, 2)
    with pytest.raises(ValueError, match="generator"):
        monte_carlo_predict(model, x, 2, generator="seed")
