"""Real-ViT experiments: definitions, paired statistics, the runner's cache and resume, every experiment at quick scale.

``quick_results`` runs all six experiments at the real quick scale (the one CI and the
README's main command run): about five minutes on a 2-core CPU, shared by every test that
reads it.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch

from dropkey import schedules
from dropkey.lab.experiments import (
    EXPERIMENT_NAMES,
    EXPERIMENTS,
    SCALE_NAMES,
    SCALES,
    analysis,
    definitions,
    experiment,
    run_experiment,
    runner,
    scale,
)
from dropkey.lab.experiments.gradient_mechanism import SETTINGS as MECHANISM_SETTINGS
from dropkey.lab.experiments.results import load_result, run_specs
from dropkey.lab.train import train
from reports import claims as registry
from reports.build import build_report
from reports.cli import build_parser, main
from reports.evidence import Evidence, load_experiment_evidence

VIT_CLAIMS = [claim for claim in registry.CLAIMS if any(m.startswith(registry.VIT_PREFIX) for m in claim.measured_by)]


@pytest.fixture(scope="session")
def quick_results(tmp_path_factory):
    base = tmp_path_factory.mktemp("experiments")
    results = {
        name: run_experiment(name, "quick", runs_dir=base / "runs", results_dir=base / "results", jobs=2)
        for name in EXPERIMENT_NAMES
    }
    return base, results


# --- definitions ----------------------------------------------------------------------------------


def test_every_experiment_builds_valid_run_configs_at_every_scale(tmp_path):
    for name in EXPERIMENT_NAMES:
        for scale_name in SCALE_NAMES:
            specs = run_specs(name, scale_name, runs_dir=tmp_path)
            s = scale(scale_name)
            seeds = s.seeds_for(name)  # the scale's seeds, or the first n of them where its budget says so
            assert len(specs) == len(experiment(name).arms(s)) * len(seeds)
            assert {spec.seed for spec in specs} == set(seeds) and len(seeds) >= 3 and seeds == s.seeds[:len(seeds)]
            for spec in specs:
                assert spec.folder.parent == tmp_path and spec.folder.name == runner.run_key(spec.config)


def test_a_seed_budget_takes_the_first_seeds_and_leaves_the_rest_whole():
    s = dataclasses.replace(SCALES["quick"], seeds=(0, 1, 2, 3), seed_budget=(("schedules", 2),))
    assert s.seeds_for("schedules") == (0, 1) and s.seeds_for("accuracy") == (0, 1, 2, 3)
    assert SCALES["small_data"].seeds_for("accuracy") == tuple(range(12))  # the powered experiments: all 12


def test_schedule_arms_share_the_mean_ratio():
    for s in SCALES.values():
        arms = {arm.name: arm for arm in experiment("schedules").arms(s)}
        for arm in arms.values():
            ratios = arm.drop_ratio if isinstance(arm.drop_ratio, tuple) else (arm.drop_ratio,)
            assert schedules.mean_ratio(ratios) == pytest.approx(s.drop_ratio, abs=1e-12)
        decreasing, increasing = arms["decreasing"].drop_ratio, arms["increasing"].drop_ratio
        assert all(a > b for a, b in zip(decreasing, decreasing[1:], strict=False))
        assert increasing == pytest.approx(tuple(reversed(decreasing)), abs=1e-12)


def test_shared_arms_are_one_run(tmp_path):
    """DropKey at the matched ratio is one training run, whichever experiment asks for it."""
    keys = {
        name: {spec.seed: spec.folder for spec in run_specs(name, "quick", runs_dir=tmp_path)
               if spec.arm.name in ("dropkey", "constant")}
        for name in ("accuracy", "attention_dynamics", "schedules", "alignment", "structured")
    }
    assert len({tuple(sorted(v.items())) for v in keys.values()}) == 1


def test_run_key_ignores_output_fields_and_changes_with_the_recipe(tmp_path):
    s, arm = scale("quick"), experiment("accuracy").arms(scale("quick"))[2]
    config = runner.train_config(s, arm, 0, runs_dir=tmp_path)
    moved = dataclasses.replace(config, out_dir="elsewhere", progress=True, data_dir="/data")
    assert runner.run_key(moved) == runner.run_key(config)
    assert runner.run_key(dataclasses.replace(config, seed=1)) != runner.run_key(config)
    assert runner.run_key(dataclasses.replace(config, drop_ratio=0.3)) != runner.run_key(config)


def test_unknown_names_raise_naming_the_allowed_values():
    with pytest.raises(ValueError, match=r"experiment must be one of \('attention_dynamics'"):
        experiment("nope")
    with pytest.raises(ValueError, match=r"scale must be one of \('quick', 'medium', 'small_data', 'full'\)"):
        scale("huge")
    with pytest.raises(ValueError, match=r"jobs must be an integer in \[1, inf\)"):
        runner.execute_all([], jobs=0)


# --- statistics ------------------------------------------------------------------------------------


def test_paired_difference_and_its_standard_error():
    values = pd.DataFrame({"arm": ["a"] * 3 + ["b"] * 4, "seed": [0, 1, 2, 0, 1, 2, 3],
                           "x": [2.0, 4.0, 6.0, 1.0, 2.0, 3.0, 100.0]})
    stats = analysis.paired_difference(values, "x", "a", "b")  # per-seed differences 1, 2, 3 (seed 3 unpaired)
    assert stats["n"] == 3 and stats["value"] == pytest.approx(2.0)
    assert stats["standard_error"] == pytest.approx(1.0 / math.sqrt(3))  # std(ddof=1) = 1
    assert math.isnan(analysis.mean_and_se([1.5])["standard_error"])
    with pytest.raises(ValueError, match="no seed has both arms"):
        analysis.paired_difference(values, "x", "a", "c")


def test_top_blocks():
    assert list(analysis.top_blocks(2)) == [0, 1]
    assert list(analysis.top_blocks(6)) == [4, 5]
    assert list(analysis.top_blocks(12)) == [8, 9, 10, 11]
    assert list(analysis.top_blocks(24)) == list(range(16, 24))


# --- runner: cache and resume ---------------------------------------------------------------------


@pytest.fixture
def tiny_scale(monkeypatch):
    """The quick scale cut to 2 epochs, 2 seeds and a 256-image subset (seconds per run)."""
    tiny = dataclasses.replace(SCALES["quick"], epochs=2, seeds=(0, 1), train_subset=256, mc_samples=(1, 2),
                               finetune_epochs=1, collapse_depths=(2, 3), collapse_epochs=2)
    monkeypatch.setitem(definitions.SCALES, "quick", tiny)
    return tiny


def _without_timing(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=["images_per_s", "epoch_time_s", "wall_time_s"]).reset_index(drop=True)


def test_interrupted_run_resumes_bit_exactly(tmp_path, tiny_scale):
    spec = run_specs("alignment", "quick", runs_dir=tmp_path / "runs")[0]
    train(spec.config, stop_after_epoch=1)  # a run cut off after its first epoch
    assert not runner.is_complete(spec.folder)
    result = run_experiment("alignment", "quick", runs_dir=tmp_path / "runs", results_dir=tmp_path / "results")
    fresh = run_experiment("alignment", "quick", runs_dir=tmp_path / "fresh", results_dir=tmp_path / "results2")
    pd.testing.assert_frame_equal(_without_timing(result.runs.drop(columns="run_key")),
                                  _without_timing(fresh.runs.drop(columns="run_key")))
    pd.testing.assert_frame_equal(result.monte_carlo.drop(columns="run_key"), fresh.monte_carlo.drop(columns="run_key"))


def test_a_second_run_trains_nothing_and_rewrites_the_same_numbers(tmp_path, tiny_scale, monkeypatch):
    first = run_experiment("accuracy", "quick", runs_dir=tmp_path / "runs", results_dir=tmp_path / "results")
    monkeypatch.setattr(runner, "train", lambda *a, **k: pytest.fail("a complete run was retrained"))
    second = run_experiment("accuracy", "quick", runs_dir=tmp_path / "runs", results_dir=tmp_path / "results")
    pd.testing.assert_frame_equal(first.comparisons, second.comparisons)
    assert (second.folder / "provenance.json").is_file()


def test_monte_carlo_is_added_to_a_run_trained_without_it(tmp_path, tiny_scale):
    run_experiment("accuracy", "quick", runs_dir=tmp_path / "runs", results_dir=tmp_path / "results")
    result = run_experiment("alignment", "quick", runs_dir=tmp_path / "runs", results_dir=tmp_path / "results")
    assert sorted(set(result.monte_carlo["k"])) == [0, 1, 2]
    plain = result.monte_carlo[result.monte_carlo["k"] == 0].set_index("seed")["test_acc"]
    final = result.runs[result.runs["arm"] == "dropkey"].groupby("seed")["test_acc"].last()
    pd.testing.assert_series_equal(plain, final, check_names=False)  # k = 0 is the trainer's plain evaluation


def test_a_run_without_its_files_is_reported(tmp_path, tiny_scale):
    specs = run_specs("accuracy", "quick", runs_dir=tmp_path)
    with pytest.raises(analysis.IncompleteRun, match="has no metrics.csv"):
        analysis.run_tables(specs)
    with pytest.raises(FileNotFoundError, match="dropkey-lab experiment accuracy --scale quick"):
        load_result(tmp_path, "quick", "accuracy")


def test_cli_experiment_command(tmp_path, tiny_scale, capsys):
    args = build_parser().parse_args(["experiment", "structured"])
    assert (args.scale, args.jobs, str(args.results_dir)) == ("quick", 1, "results")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["experiment", "nope"])
    code = main(["experiment", "structured", "--runs-dir", str(tmp_path / "r"), "--results-dir", str(tmp_path / "out"),
                 "--no-progress", "--seeds", "0,1"])
    out = capsys.readouterr().out
    assert code == 0 and "vit-structured: " in out and "top1_block_minus_dropkey: " in out and "95% CI" in out
    assert main(["experiment", "structured", "--seeds", "a,b"]) == 2


# --- every experiment at quick scale ---------------------------------------------------------------


def test_quick_experiments_measure_every_claim(quick_results):
    base, results = quick_results
    for result in results.values():
        assert {p.name for p in result.folder.iterdir()} >= {
            "runs.csv", "attention.csv", "finals.csv", "per_seed.csv", "comparisons.csv", "summary.json",
            "config.json", "provenance.json", "complete.json"}
        if experiment(result.name).run is None:  # trained arm by arm, seed by seed
            assert set(result.finals["seed"]) == set(SCALES["quick"].seeds)
            assert set(result.per_seed["seed"]) == set(SCALES["quick"].seeds)
        else:  # the gradient-mechanism probe: the scale's first seed; its replicates are mask passes
            assert set(result.finals["seed"]) == {SCALES["quick"].seeds[0]}
            assert set(result.per_seed["seed"]) == set(range(MECHANISM_SETTINGS["quick"].masks))
        assert np.isfinite(result.per_seed["value"]).all()
    evidence = Evidence(experiments=load_experiment_evidence(base / "results"))
    for claim in VIT_CLAIMS:
        verdict = registry.assess(claim, evidence)
        assert verdict.status != "not yet measured", (claim.id, verdict)
        replicates = MECHANISM_SETTINGS["quick"].masks if claim.id == "vit-gradient-mechanism" else 3
        if claim.id == "vit-gradient-mechanism":  # one cell per probed run, checkpoint and ratio
            assert verdict.key_number.startswith(f"[quick scale, {2 * 3 * 2} cells, n = {replicates} mask passes]")
        else:
            assert verdict.key_number.startswith("[quick scale, n = 3 seeds]")
        assert {f.quantity.name for f in verdict.findings} == {q.name for q in claim.quantities}
        for finding in verdict.findings:  # every registered quantity has a measured outcome
            assert finding.decision.outcome != "not yet measured", (claim.id, finding.text())
            assert finding.decision.n == replicates


def test_per_seed_rows_are_the_comparisons_seed_by_seed(quick_results):
    _, results = quick_results
    result = results["accuracy"]
    finals = result.finals.set_index(["arm", "seed"])["top1"]
    rows = result.per_seed[result.per_seed["quantity"] == "top1_dropkey_minus_none"].set_index("seed")["value"]
    for seed, value in rows.items():
        assert value == pytest.approx(finals[("dropkey", seed)] - finals[("none", seed)], abs=1e-8)
    summary = result.comparisons.set_index("quantity").loc["top1_dropkey_minus_none"]
    assert summary["value"] == pytest.approx(rows.mean()) and summary["n"] == len(rows)


def test_quick_runs_learn_and_record_attention(quick_results):
    _, results = quick_results
    finals = results["accuracy"].finals
    assert (finals["top1"] > 30.0).all()  # chance is 10 %: every arm learns within 15 epochs
    attention = results["attention_dynamics"].attention
    assert set(attention["metric"]) >= {"peak", "entropy", "abs_grad_top", "abs_grad_rest", "similarity"}
    assert sorted(set(attention["epoch"])) == list(range(0, SCALES["quick"].epochs + 1))  # 0: at initialisation
    # entropy of a row of 17 keys lies in [0, log 17]; peaks in [1/17, 1]
    peak = attention[attention["metric"] == "peak"]["value"]
    entropy = attention[attention["metric"] == "entropy"]["value"]
    assert peak.between(1 / 17, 1).all() and entropy.between(0, math.log(17) + 1e-9).all()
    # the exact expectation under DropKey's masks is majorised by the learned rows (theory, per row, hence
    # on the means): lower peak, higher entropy; under no regulariser and post-softmax dropout E[w] = p
    finals = results["attention_dynamics"].finals.set_index("arm")
    dropkey = finals.loc["dropkey"]
    assert (dropkey["expected_peak"] <= dropkey["learned_peak"] + 1e-12).all()
    assert (dropkey["expected_entropy"] >= dropkey["learned_entropy"] - 1e-12).all()
    assert (dropkey["expected_peak"] < dropkey["learned_peak"]).all()
    for arm in ("none", "dropout"):
        assert finals.loc[arm, "expected_peak"].to_numpy() == pytest.approx(finals.loc[arm, "learned_peak"].to_numpy())


def test_quick_collapse_sweeps_depth_and_alignment_sweeps_k(quick_results):
    _, results = quick_results
    collapse = results["collapse"].finals
    assert sorted(set(collapse["depth"])) == list(SCALES["quick"].collapse_depths)
    assert set(collapse["arm"]) == {"plain", "reattention", "dropkey", "dropkey+reattention"}
    unmixed = collapse[collapse["arm"].isin(["plain", "dropkey"])]  # no Re-attention: maps are the softmax weights
    assert unmixed["top_similarity"].to_numpy() == pytest.approx(unmixed["top_similarity_softmax"].to_numpy(), abs=1e-9)
    for column in ("top_similarity_centred", "top_similarity_centred_init"):  # correlations, measured at init too
        assert collapse[column].between(-1, 1).all()
    assert (collapse["top_similarity_centred"] != collapse["top_similarity_centred_init"]).all()  # training moved them
    trend = results["collapse"].per_seed.query("quantity == 'collapse_trend_plain'")
    assert sorted(trend["seed"]) == list(SCALES["quick"].seeds)
    per_seed = results["collapse"].per_seed
    adjusted = per_seed.query("quantity == 'centred_similarity_dropkey_minus_plain' and group == ''")
    assert np.isfinite(adjusted["covariate"]).all()  # the entropy difference of the same two runs
    mc = results["alignment"].monte_carlo
    assert sorted(set(mc["k"])) == [0, *SCALES["quick"].mc_samples]


def test_experiment_pages_show_figures_tables_and_provenance(quick_results, tmp_path):
    base, _ = quick_results
    report = build_report(tmp_path / "report", configs={}, cache_dir=tmp_path / "cache", results_dir=base / "results")
    for name in EXPERIMENT_NAMES:
        page = (tmp_path / "report" / f"vit_{name}.html").read_text(encoding="utf-8")
        assert page.count("<figure") >= 2 and page.count("<svg") >= 2, name
        assert "<table" in page and "git_commit" in page and "quick scale" in page
        assert "not yet measured</span> at medium, small_data, full scale" in page  # and says so plainly
        assert 'href="data:text/csv;base64,' in page and '<math display="block">' in page
        assert not re.search(r"(?:src|href)=\"(?:https?:)?//", page), name
    index = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    for name in EXPERIMENT_NAMES:
        assert f'href="vit_{name}.html"' in index
    for claim in VIT_CLAIMS:
        assert report.verdicts[claim.id].status != "not yet measured"
    again = build_report(tmp_path / "again", configs={}, cache_dir=tmp_path / "cache", results_dir=base / "results")
    for path in again.pages.values():  # regenerated from the same results: identical bytes
        assert path.read_bytes() == (tmp_path / "report" / path.name).read_bytes()


def test_experiments_registry_names_its_claims():
    claim_ids = {claim.id for claim in registry.CLAIMS}
    for spec in EXPERIMENTS:
        assert set(spec.claims) <= claim_ids
        for claim_id in spec.claims:
            assert registry.VIT_PREFIX + spec.name in registry.claim(claim_id).measured_by
    for claim in VIT_CLAIMS:  # each real-ViT claim is measured by exactly one experiment, which lists it
        assert len(claim.measured_by) == 1 and claim.quantities
        assert claim.id in experiment(claim.measured_by[0].removeprefix(registry.VIT_PREFIX)).claims, claim.id


def test_train_evaluation_reads_the_runs_own_training_images(quick_results):
    """train_evaluation.csv: the final model's clean accuracy on the trainer's own training subset (recomputed
    here through the trainer), and E[w] = p for a run without regulariser; the gap is that minus test top-1."""
    from dropkey.lab.checkpoints import read_checkpoint
    from dropkey.lab.train import Trainer

    base, results = quick_results
    spec = next(s for s in run_specs("accuracy", "quick", runs_dir=base / "runs") if s.arm.name == "none")
    table = pd.read_csv(spec.folder / runner.TRAIN_EVALUATION_FILE)
    trainer = Trainer(spec.config)
    trainer.model.load_state_dict(read_checkpoint(spec.folder / "checkpoint.pt")["model"])
    trainer.model.eval()
    with torch.no_grad():
        predicted = trainer.model(trainer.normalize(trainer.train_set.images)).argmax(-1)
    accuracy = float((predicted == trainer.train_set.labels).double().mean())
    assert table.query("metric == 'clean_accuracy'")["value"].item() == pytest.approx(accuracy, abs=1e-12)
    blocks = table[table["layer"] >= 0].pivot_table(index="layer", columns="metric", values="value")
    np.testing.assert_allclose(blocks["expected_peak"], blocks["learned_peak"], rtol=1e-12)
    finals = results["accuracy"].finals.set_index(["arm", "seed"]).loc[("none", spec.seed)]
    assert finals["gap"] == pytest.approx(100 * accuracy - finals["top1"], abs=1e-9)


def test_finetune_starts_from_the_runs_weights_on_its_own_schedule(tmp_path, tiny_scale):
    """The alignment fine-tune continues the DropKey run's final weights with a fresh cosine from its own lr.

    At a vanishing lr the fine-tuned model is the trained one, so its test accuracy is the run's plain
    inference exactly (a fresh model would be near chance); at the scale's lr its lr column is the
    cosine of its own length (0.5 lr after the first of two epochs, 0 at the end), not the main run's tail.
    """
    from dropkey.lab.experiments.finetune import FINETUNE_FILE, FineTune, finetune_run, has_finetune

    spec = run_specs("alignment", "quick", runs_dir=tmp_path / "runs")[0]
    assert spec.arm.name == "dropkey" and spec.finetune == FineTune(tiny_scale.finetune_epochs, tiny_scale.finetune_lr)
    runner.execute(dataclasses.replace(spec, finetune=None))
    plain = pd.read_csv(spec.folder / "metrics.csv")["test_acc"].iloc[-1]
    frozen = finetune_run(spec.folder, spec.config, FineTune(1, 1e-12))
    assert frozen["test_acc"].iloc[-1] == pytest.approx(plain, abs=1e-12)
    assert not (spec.folder.parent / f"{spec.folder.name}.finetune").exists()  # the work folder is removed
    assert not has_finetune(spec.folder, FineTune(2, 1e-4))  # other settings: done again
    table = finetune_run(spec.folder, spec.config, FineTune(2, 1e-4))
    assert table["lr"].to_numpy() == pytest.approx([0.5e-4, 0.0], abs=1e-12)
    assert has_finetune(spec.folder, FineTune(2, 1e-4)) and (spec.folder / FINETUNE_FILE).is_file()
    with pytest.raises(ValueError, match="finetune lr must be"):
        FineTune(2, 0.0)


def test_alignment_reads_the_finetune_against_the_same_runs_plain_inference(tmp_path, tiny_scale):
    result = run_experiment("alignment", "quick", runs_dir=tmp_path / "runs", results_dir=tmp_path / "results")
    assert set(result.finals["arm"]) == {"dropkey"}
    rows = result.per_seed[result.per_seed["quantity"] == "top1_finetune_minus_plain"].set_index("seed")["value"]
    finals = result.finals.set_index("seed")
    for seed, value in rows.items():
        assert value == pytest.approx(finals.loc[seed, "finetune_top1"] - finals.loc[seed, "top1"], abs=1e-9)
    assert sorted(rows.index) == list(tiny_scale.seeds)
