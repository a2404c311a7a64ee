"""The gradient-mechanism probe and the overfitting calibration (issue 17): what they compute, checked
against finite differences, a real AdamW step and hand-made tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from dropkey.diagnostics import peak_weight
from dropkey.lab.experiments.calibration import MIN_GAP, judge
from dropkey.lab.experiments.gradient_mechanism import cell_table, paired_differences
from dropkey.lab.experiments.mechanism import (
    MechanismSettings,
    adam_preconditioner,
    checkpoint_epochs,
    probe_checkpoint,
)
from dropkey.models import create_model


@pytest.fixture
def tiny():
    """A 2-block digits ViT in float64 on its reference path; a probe set of 2 batches of 4 images, with labels."""
    torch.manual_seed(0)
    model = create_model("vit_tiny_8", depth=2, fused_attn=False, attn_variant="dropkey", drop_ratio=0.1).double()
    images = torch.randn(2, 4, 1, 8, 8, dtype=torch.float64)
    labels = (torch.arange(8) % 10).reshape(2, 4)
    return model, list(model.parameters()), images, labels


def _probe(model, params, images, labels, settings, **options):
    fields = dict(lr=1e-3, label_smoothing=0.0, mask_seed=5, epoch=1) | options
    return pd.DataFrame(probe_checkpoint(model, params, None, images, labels, settings, **fields))


def _block_peaks(model, images) -> list[float]:
    weights = []
    handles = [m.weights_probe.register_forward_hook(lambda mod, i, out: weights.append(out))
               for m in model.modules() if hasattr(m, "weights_probe")]
    model.eval()
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    return [float(peak_weight(w).mean()) for w in weights]


def test_none_change_is_the_first_order_change_of_the_peak_along_a_gradient_step(tiny):
    """-lr J g of the whole probe set matches the central difference (P(theta - lr g) - P(theta + lr g)) / 2."""
    model, params, images, labels = tiny
    settings = MechanismSettings(drop_ratios=(0.1,), regularisers=("dropkey",), masks=2, batches=2, batch_size=4)
    lr = 1e-4
    rows = _probe(model, params, images, labels, settings, lr=lr, label_smoothing=0.1)
    predicted = rows.query("regulariser == 'none' and metric == 'peak' and step == 'sgd'").sort_values("block")
    model.eval()
    grads = [torch.zeros_like(p) for p in params]
    for b in range(2):  # the probe set's gradient: the mean of its equal batches' gradients
        loss = F.cross_entropy(model(images[b]), labels[b], label_smoothing=0.1)
        for total, g in zip(grads, torch.autograd.grad(loss, params), strict=True):
            total += g / 2

    def peaks_at(t: float) -> np.ndarray:  # the probe set's block peaks at theta - t g
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= t * g
        out = (np.array(_block_peaks(model, images[0])) + np.array(_block_peaks(model, images[1]))) / 2
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p += t * g
        return out

    actual = (peaks_at(lr) - peaks_at(-lr)) / 2
    # float64 throughout; the remainder shrinks fast with lr (relative 8e-4 at lr = 1e-3, under 1e-6 at 1e-4)
    np.testing.assert_allclose(predicted["value"].to_numpy(), actual, rtol=1e-6)
    assert np.abs(actual).min() > 1e-9  # the test can fail: the change is well above rounding
    clean = rows.query("regulariser == 'clean' and metric == 'peak'").sort_values("block")["value"].to_numpy()
    np.testing.assert_allclose(clean, peaks_at(0.0), rtol=1e-12)


def test_probe_restores_the_model_and_is_reproducible(tiny):
    model, params, images, labels = tiny
    settings = MechanismSettings(drop_ratios=(0.2,), masks=3, batches=2, batch_size=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first, second = (_probe(model, params, images, labels, settings) for _ in range(2))
    assert first.equals(second)
    other = _probe(model, params, images, labels, settings, mask_seed=6)
    query = "regulariser == 'dropkey' and metric == 'peak'"
    assert not np.allclose(first.query(query)["value"], other.query(query)["value"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(m.drop_ratio == 0.1 and m.variant == "dropkey" for m in model.modules() if hasattr(m, "weights_probe"))
    changes = first.query("regulariser == 'dropkey' and step == 'sgd' and metric == 'peak'")
    assert sorted(set(changes["pass"])) == [0, 1, 2]  # one value per mask pass: the replicates
    assert changes.groupby("pass")["value"].nunique().eq(2).all()  # one per block
    assert changes.groupby("block")["value"].std().gt(0).all()  # the passes differ: fresh masks each
    assert set(first["metric"]) == {"peak", "entropy", "expected_peak", "expected_entropy", "log_top_rest_gradient"}
    clean = first.query("regulariser == 'clean'").pivot_table(index="block", columns="metric", values="value")
    # E[w] is majorised by p (docs/theory.md): a lower peak, a higher entropy, in every block
    assert (clean["expected_peak"] < clean["peak"]).all() and (clean["expected_entropy"] > clean["entropy"]).all()
    logit = first.query("metric == 'log_top_rest_gradient'")
    assert set(logit["batch"]) == {0, 1} and np.isfinite(logit["value"]).all()


def test_mask_passes_average_to_the_expected_change(tiny):
    """The mean over K passes of the DropKey change approaches the change along the exact expected gradient:
    at a tiny ratio the passes' spread shrinks and their mean approaches the clean change (r -> 0)."""
    model, params, images, labels = tiny
    settings = MechanismSettings(drop_ratios=(1e-6,), regularisers=("dropkey",), masks=2, batches=2, batch_size=4)
    rows = _probe(model, params, images, labels, settings)
    peak = rows.query("metric == 'peak' and step == 'sgd'")
    none = peak.query("regulariser == 'none'").sort_values("block")["value"].to_numpy()
    for _, one_pass in peak.query("regulariser == 'dropkey'").groupby("pass"):
        # with r = 1e-6 and 2 x 4 x 2 x 17 x 17 ~ 4,600 logits per block, every mask keeps all (P > 0.99)
        np.testing.assert_allclose(one_pass.sort_values("block")["value"].to_numpy(), none, rtol=1e-10)


def test_adam_preconditioner_reproduces_a_real_adamw_step(tiny):
    """After one AdamW step (no weight decay), lr * M * g is exactly the step taken (m_hat = g at step 1)."""
    model, _, images, labels = tiny
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    params = decay + rest  # the optimizer's order: its groups, in turn
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": rest}], lr=1e-3, weight_decay=0.0)
    model.eval()
    F.cross_entropy(model(images[0]), labels[0]).backward()
    gradient = torch.cat([p.grad.reshape(-1) for p in params]).double()
    before = torch.cat([p.detach().reshape(-1) for p in params]).clone()
    optimizer.step()
    taken = torch.cat([p.detach().reshape(-1) for p in params]) - before
    M = adam_preconditioner(optimizer.state_dict(), params, gradient)
    np.testing.assert_allclose(taken.numpy(), (-1e-3 * M * gradient).numpy(), rtol=1e-9, atol=1e-15)
    with pytest.raises(ValueError, match="optimizer_state"):
        adam_preconditioner(optimizer.state_dict(), params[:-1], gradient)


def test_settings_are_validated_and_checkpoints_rounded():
    assert checkpoint_epochs(MechanismSettings(), 30) == (0, 3, 15, 30)
    assert checkpoint_epochs(MechanismSettings(checkpoints=(1.0, 0.0, 0.01)), 10) == (0, 10)
    for field, bad in (("drop_ratios", (0.0,)), ("drop_ratios", (1.0,)), ("masks", 1), ("checkpoints", (1.5,)),
                       ("regularisers", ("dropattention",)), ("trained_arms", ("dropout",))):
        with pytest.raises(ValueError, match=field):
            MechanismSettings(**{field: bad})


def test_paired_differences_and_cells_by_hand():
    rows = []
    base = dict(trained_arm="none", epoch=3, metric="peak", step="sgd", batch=-1)
    for block, shift in ((0, 0.0), (1, 1.0)):
        rows.append(base | dict(block=block, regulariser="none", drop_ratio=0.0, value=1.0 + shift, **{"pass": -1}))
        for m, dk in enumerate((0.5, 0.0, 0.4)):
            rows.append(base | dict(block=block, regulariser="dropkey", drop_ratio=0.1, value=dk + 2 * shift,
                                    **{"pass": m}))
    rows.append(base | dict(block=0, regulariser="clean", drop_ratio=0.0, value=0.3, **{"pass": -1}))
    differences = paired_differences(pd.DataFrame(rows))
    block0 = differences.query("block == 0").sort_values("pass")["difference"].to_numpy()
    np.testing.assert_allclose(block0, [-0.5, -1.0, -0.6])
    mean = differences.query("block == -1").sort_values("pass")["difference"].to_numpy()
    np.testing.assert_allclose(mean, [0.0, -0.5, -0.1])  # blocks' mean: (d0 + d0 + 1) / 2
    cells = cell_table(differences).set_index("block")
    values = np.array([-0.5, -1.0, -0.6])
    se = values.std(ddof=1) / math.sqrt(3)
    assert cells.loc[0, "mean"] == pytest.approx(values.mean())
    assert cells.loc[0, "standard_error"] == pytest.approx(se)
    assert cells.loc[0, "ci_high"] == pytest.approx(values.mean() + 4.302652729749464 * se)  # t(0.975, 2)
    assert cells.loc[0, "n"] == 3


def _curve(train, test, epochs=50):
    return pd.DataFrame({"epoch": np.arange(5, epochs + 1, 5), "train_clean_acc": train, "test_acc": test,
                         "wall_time_s": np.arange(10.0)})


def test_calibration_criteria():
    good = judge(_curve(np.full(10, 0.995), np.r_[np.linspace(0.6, 0.8, 7), 0.801, 0.8015, 0.8012]), 50)
    assert good["meets_all"] and good["late_evaluations"] == 3
    still_rising = judge(_curve(np.full(10, 0.995), np.r_[np.linspace(0.6, 0.8, 7), 0.80, 0.803, 0.806]), 50)
    assert still_rising["fits"] and not still_rising["plateaued"] and not still_rising["meets_all"]
    underfit = judge(_curve(np.full(10, 0.98), np.full(10, 0.7)), 50)
    assert not underfit["fits"]
    small_gap = judge(_curve(np.full(10, 0.995), np.full(10, 0.995 - MIN_GAP + 0.01)), 50)
    assert small_gap["plateaued"] and not small_gap["gap_large"]


def test_calibration_trains_cheapest_first_and_stops_at_the_first_regime_that_meets_every_criterion(
        tmp_path, monkeypatch, capsys):
    """End to end on digits (seconds): curves and verdicts written; a candidate after the chosen one is not trained."""
    from dropkey.lab.experiments import calibration
    from reports.cli import main

    monkeypatch.setitem(calibration.CANDIDATES, "quick", (
        calibration.Candidate("short", (("epochs", 2), ("eval_every", 1), ("train_subset", 200))),
        calibration.Candidate("longer", (("epochs", 3), ("eval_every", 1), ("train_subset", 200))),
        calibration.Candidate("longest", (("epochs", 4), ("eval_every", 1), ("train_subset", 200))),
    ))
    # criteria a 2-epoch digits run cannot meet, then ones the 3-epoch run meets: only the first two are trained
    verdicts = iter([False, True])
    real_judge = calibration.judge
    monkeypatch.setattr(calibration, "judge", lambda curve, epochs: real_judge(curve, epochs) | {
        "meets_all": next(verdicts)})
    code = main(["calibrate", "--scale", "quick", "--runs-dir", str(tmp_path / "runs"),
                 "--results-dir", str(tmp_path / "results")])
    assert code == 0 and "calibration (quick scale)" in capsys.readouterr().out
    folder = tmp_path / "results" / "quick" / "calibration"
    table = pd.read_csv(folder / "candidates.csv").set_index("candidate")
    assert table["chosen"].to_dict() == {"short": False, "longer": True, "longest": False}
    assert table.loc["longest", "note"].startswith("not run")
    curves = pd.read_csv(folder / "curves.csv")
    assert set(curves["candidate"]) == {"short", "longer"}
    assert curves.groupby("candidate")["epoch"].max().to_dict() == {"short": 2, "longer": 3}
    assert curves["train_clean_acc"].between(0, 1).all() and curves["test_acc"].between(0, 1).all()
    assert not list((tmp_path / "runs" / "calibration").glob("longest-*"))
    assert main(["calibrate", "--scale", "medium", "--runs-dir", str(tmp_path / "runs")]) == 1  # no candidates
    assert "scale must be one of" in capsys.readouterr().err


def test_every_scale_probes_its_own_drop_ratio():
    from dropkey.lab.experiments import SCALES
    from dropkey.lab.experiments.gradient_mechanism import SETTINGS

    for name, s in SCALES.items():
        assert s.drop_ratio in SETTINGS[name].drop_ratios, name
        assert set(SETTINGS[name].trained_arms) == {"none", "dropkey"}
