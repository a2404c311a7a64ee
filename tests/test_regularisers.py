"""The regulariser registry, and docs/extending.md's worked example: registered from the page, trained with."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch
from test_contract import check_regulariser_contract

from dropkey import regularisers
from dropkey.models import create_model
from dropkey.modules import VARIANTS, DropKeyAttention
from simulations.toy_optimisation import training_weights

EXTENDING = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def test_the_built_in_regularisers_in_order():
    assert regularisers.names() == ("none", "dropout", "dropattention", "dropkey", "dropkey_block", "dropkey_cross")
    assert regularisers.grid_names() == ("dropkey_block", "dropkey_cross")
    assert VARIANTS == regularisers.names()  # the module's old constant reads the registry
    acts = {name: (regularisers.get(name).acts, regularisers.get(name).rescales) for name in regularisers.names()}
    assert acts["dropkey"] == (regularisers.BEFORE_SOFTMAX, False)
    assert acts["dropout"] == (regularisers.AFTER_SOFTMAX, True)
    assert acts["dropattention"] == (regularisers.AFTER_SOFTMAX, False)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: regularisers.create("dropblock"), "variant must be one of"),
        (lambda: regularisers.create("dropkey", all_dropped="nan"), "all_dropped must be one of"),
        (lambda: regularisers.create("dropkey", grid=(4, 4)), r"dropkey has no setting \['grid'\]"),
        (lambda: regularisers.create("dropkey_block"), "needs grid"),
        (lambda: regularisers.create("dropkey_cross", grid=(4,)), "grid must be a pair"),
        (lambda: regularisers.create("dropkey_block", grid=(4, 0)), r"grid\[1\] must be an integer in \[1, inf\)"),
        (lambda: regularisers.create("dropkey_block", grid=(4, 4), num_prefix_tokens=-1),
         r"num_prefix_tokens must be an integer in \[0, inf\)"),
        (lambda: regularisers.create("dropkey_block", grid=(4, 4), block_side=0), r"block_side must be an integer"),
        (lambda: regularisers.create("dropkey_cross", grid=(4, 4), cross_arm=0), r"cross_arm must be an integer"),
        (lambda: regularisers.create(regularisers.DropKey(), all_dropped="zero"), "set them on it"),
    ],
)
def test_bad_settings_are_value_errors_naming_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_registering_twice_or_a_bad_name_fails():
    with pytest.raises(ValueError, match="already registered"):
        regularisers.register(type(regularisers.DropKey()))
    bad = types.new_class("Bad", (regularisers.Regulariser,))
    with pytest.raises(TypeError, match="dataclass"):
        regularisers.register(bad)
    with pytest.raises(TypeError):
        regularisers.register(int)


def test_from_settings_takes_the_settings_a_regulariser_names():
    available = {"all_dropped": "zero", "grid": (2, 2), "num_prefix_tokens": 0, "block_side": 2, "cross_arm": 1}
    assert regularisers.from_settings("dropkey", available) == regularisers.DropKey(all_dropped="zero")
    block = regularisers.from_settings("dropkey_block", available)
    assert (block.grid, block.num_prefix_tokens, block.block_side) == ((2, 2), 0, 2)


def test_the_toy_optimisation_takes_its_weights_from_the_registry():
    """training_weights is the registered regulariser's weights: for DropKey the masked softmax with the
    uniform convention, for DropAttention the same function of (logits, mask) up to rounding."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 5, generator=g, dtype=torch.float64)
    keep = torch.rand(64, 5, generator=g, dtype=torch.float64) >= 0.6
    dead = ~keep.any(-1)
    assert dead.any()  # all-dropped rows are exercised
    w = training_weights("dropkey", logits, keep, 0.6)
    assert torch.equal(w, regularisers.DropKey().weights(logits, keep, 0.6))
    torch.testing.assert_close(w[dead], torch.full_like(w[dead], 0.2))
    torch.testing.assert_close(training_weights("dropattention", logits, keep, 0.6), w, rtol=1e-14, atol=1e-15)
    dropout = training_weights("dropout", logits, keep, 0.6)
    torch.testing.assert_close(dropout, torch.softmax(logits, -1) * keep / 0.4)
    assert torch.equal(training_weights("none", logits, None, 0.0), torch.softmax(logits, -1))


# --------------------------------------------------------------------------- the worked example


def _example_source() -> str:
    """The first python block of the section "Adding a regulariser" of docs/extending.md."""
    text = EXTENDING.read_text()
    section = text.split("## Adding a regulariser", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)[0]


@pytest.fixture
def example_regulariser():
    """docs/extending.md's example, imported as a module (so registered), removed afterwards."""
    module = types.ModuleType("dropkey_keep_prefix_example")
    sys.modules[module.__name__] = module
    try:
        exec(compile(_example_source(), "docs/extending.md", "exec"), module.__dict__)
        yield module.DropKeyKeepPrefix
    finally:
        sys.modules.pop(module.__name__, None)
        if "dropkey_keep_prefix" in regularisers.names():
            regularisers.unregister("dropkey_keep_prefix")


def test_the_worked_example_registers_and_keeps_the_prefix(example_regulariser):
    assert "dropkey_keep_prefix" in regularisers.names()
    example = regularisers.create("dropkey_keep_prefix", num_prefix_tokens=2)
    keep = example.keep_mask((64, 4, 9, 9), 0.7, regularisers.Context(generator=torch.Generator().manual_seed(0)))
    assert keep[..., :2].all() and not keep[..., 2:].all()
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        regularisers.create("dropkey_keep_prefix", num_prefix_tokens=-1)


def test_the_worked_example_passes_the_contract(example_regulariser):
    check_regulariser_contract("dropkey_keep_prefix")


def test_a_model_trains_a_step_with_the_worked_example(example_regulariser):
    torch.manual_seed(0)
    model = create_model("vit_tiny_8", attn_variant="dropkey_keep_prefix", drop_ratio=0.3, mask_seed=1).train()
    assert {type(a.regulariser) for a in model.attention_modules} == {example_regulariser}
    images = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(8) % 10
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimiser.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True) if b.grad is not None)
    # and the regulariser acts: the same step in eval mode gives other logits
    with torch.no_grad():
        assert not torch.equal(model.train()(images), model.eval()(images))
    # the module-level API of the page works too
    attn = DropKeyAttention(64, 4, variant="dropkey_keep_prefix", drop_ratio=0.2)
    assert attn.variant == "dropkey_keep_prefix" and attn.regulariser.num_prefix_tokens == 1
