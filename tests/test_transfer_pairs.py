"""Which pairs the transfer stage measures, its shards and its size: on hand-made trial specs,
no Ray, no training."""

from __future__ import annotations

import random

import pytest
import yaml
from conftest import tiny_sweep

from advlab import transfer_pairs
from advlab.cli import main
from advlab.spec import DatasetSpec, SpecError, TrialSpec
from advlab.sweep_settings import TransferSpec
from advlab.tables import NOISE_SOURCE
from advlab.transfer_pairs import check_size, estimate, plan_shards, trial_targets


def grid(seeds: range, models=("fc10", "fc16-10"), subsets=("p1", "p2")) -> dict[str, TrialSpec]:
    specs = [TrialSpec(model=m, subset=s, seed=k) for k in seeds for m in models for s in subsets]
    return {spec.trial_id(): spec for spec in specs}


def targets(specs: dict[str, TrialSpec], **settings) -> dict[str, set[str]]:
    found = trial_targets(specs, TransferSpec(**settings))
    return {source: set(chosen) for source, chosen in found.items()}


def test_all_and_within_pair_exactly_the_trials_that_share_the_keys() -> None:
    specs = grid(range(2))  # 8 trials: 2 models x 2 subsets x 2 seeds
    ids = set(specs)
    assert targets(specs) == {t: ids for t in ids}
    by_subset = targets(specs, pairs="within", within=["subset"])
    by_both = targets(specs, pairs="within", within=["subset", "model"])
    for source, spec in specs.items():  # brute force over every pair
        assert by_subset[source] == {t for t in ids if specs[t].subset == spec.subset}
        assert by_both[source] == {
            t for t in ids if (specs[t].subset, specs[t].model) == (spec.subset, spec.model)
        }
    assert {len(v) for v in by_subset.values()} == {4} and {len(v) for v in by_both.values()} == {2}


def test_trials_of_other_data_never_pair() -> None:
    specs = grid(range(1)) | {
        s.trial_id(): s
        for s in [TrialSpec(dataset=DatasetSpec(name="fashion_mnist"), seed=k) for k in range(3)]
    }
    fashion = {t for t, s in specs.items() if s.dataset.name == "fashion_mnist"}
    for mode in ({}, {"pairs": "sample", "sample": 5}):
        for source, chosen in targets(specs, **mode).items():
            assert (chosen <= fashion) == (source in fashion) and chosen


def test_sample_is_itself_plus_k_seeded_targets_and_ignores_order() -> None:
    specs = grid(range(4))  # 16 trials
    picked = targets(specs, pairs="sample", sample=3)
    for source, chosen in picked.items():
        assert source in chosen and len(chosen) == 4
    shuffled = list(specs.items())
    random.Random(1).shuffle(shuffled)
    assert targets(dict(shuffled), pairs="sample", sample=3) == picked  # order plays no part
    assert targets(specs, pairs="sample", sample=3, seed=1) != picked  # the seed does
    within = targets(specs, pairs="sample", sample=3, within=["subset"])
    for source, chosen in within.items():
        assert len(chosen) == 4 and {specs[t].subset for t in chosen} == {specs[source].subset}
    everything = targets(specs, pairs="sample", sample=100)  # more than there are: all
    assert everything == targets(specs)


def test_a_growing_sweep_keeps_its_sampled_pairs() -> None:
    small, grown = grid(range(4)), grid(range(10))
    assert set(small) < set(grown)
    before = targets(small, pairs="sample", sample=3)
    after = targets(grown, pairs="sample", sample=3)
    new = set(grown) - set(small)
    for source, chosen in before.items():
        # a pair leaves only for a new target that ranks before it; none is reshuffled
        assert after[source] <= chosen | new
        for dropped in chosen - after[source]:
            rank = transfer_pairs.pair_rank(0, source, dropped)
            assert all(transfer_pairs.pair_rank(0, source, t) < rank for t in after[source] & new)


def test_every_pair_and_control_lands_in_exactly_one_shard(monkeypatch) -> None:
    monkeypatch.setattr(transfer_pairs, "SHARD_SOURCES", 3)
    specs = grid(range(2))
    settings = TransferSpec(pairs="sample", sample=4, controls=["knn", "constant"])
    shards = plan_shards(specs, {}, settings, noise=True)
    seen = [(source, s.target) for s in shards for source in s.sources]
    assert len(seen) == len(set(seen))
    want = {(s, t) for s, ts in trial_targets(specs, settings).items() for t in ts}
    want |= {(s, c) for s in specs for c in settings.controls}
    assert {p for p in seen if p[0] != NOISE_SOURCE} == want
    assert all(len(s.sources) <= 3 for s in shards)
    # the noise rows: once per trial target, once per control (one training set per subset)
    assert sum(1 for p in seen if p[0] == NOISE_SOURCE) == len(specs) + 2
    assert estimate(list(specs.values()), settings).pairs == len(want)


def test_shard_ids_survive_growth_and_follow_their_inputs(monkeypatch) -> None:
    monkeypatch.setattr(transfer_pairs, "SHARD_SOURCES", 4)
    small, grown = grid(range(2)), grid(range(3))
    order = [*small, *(t for t in grown if t not in small)]  # new trials come last
    grown = {t: grown[t] for t in order}
    settings = TransferSpec(controls=[])
    runs = {t: ["a1"] for t in grown}
    ids = {s.shard_id(runs, settings) for s in plan_shards(small, {}, settings)}
    after = {s.shard_id(runs, settings) for s in plan_shards(grown, {}, settings)}
    # 8 old targets x sources in blocks of 4: the first two blocks (8 old sources) stay
    assert len(ids & after) == 8 * 2 and len(ids) == 8 * 2
    runs[next(iter(small))] = ["a1", "a2"]  # an attack run added to one source
    rerun = {s.shard_id(runs, settings) for s in plan_shards(small, {}, settings)}
    assert len(ids - rerun) == 8  # each target's block holding that source
    changed = TransferSpec(controls=[], amplify_rms=[0.2])
    assert not ids & {s.shard_id(runs, changed) for s in plan_shards(small, {}, changed)}
    wider = TransferSpec(controls=[], max_pairs=10)  # chooses shards, changes no rows
    runs[next(iter(small))] = ["a1"]
    assert ids == {s.shard_id(runs, wider) for s in plan_shards(small, {}, wider)}


def test_size_counts_pairs_rows_and_examples() -> None:
    specs = list(grid(range(2)).values())  # fgsm at 2 budgets + lbfgs: 3 runs x 3 kinds
    size = estimate(specs, TransferSpec())
    assert size.pairs == 8 * (8 + 4) and size.rows == size.pairs * 9
    assert size.example_rows == size.rows * 100
    sampled = estimate(specs, TransferSpec(pairs="sample", sample=2, noise=False))
    assert sampled.pairs == 8 * (1 + 2 + 4) and sampled.rows == sampled.pairs * 6


def test_a_stage_too_large_is_refused_with_its_size_and_the_setting_that_fits() -> None:
    specs = list(grid(range(5)).values())  # 20 trials: 20 x (20 + 4) pairs
    check_size(specs, TransferSpec(max_pairs=480))
    with pytest.raises(SpecError) as err:
        check_size(specs, TransferSpec(max_pairs=479))
    assert str(err.value) == (
        "transfer.pairs: all over 20 trials makes 480 source-target pairs (4,320 rows), over "
        "transfer.max_pairs (479); set transfer.pairs: sample with transfer.sample: 18 (460 "
        "pairs), or transfer.enabled: false"
    )
    check_size(specs, TransferSpec(pairs="sample", sample=18, max_pairs=479))
    with pytest.raises(SpecError, match=r"transfer\.within: 'subsett' is no trial key"):
        check_size(specs, TransferSpec(pairs="within", within=["subsett"]))
    with pytest.raises(SpecError, match=r"transfer\.per_example: 36,720,000 rows"):
        check_size(specs * 10, TransferSpec(per_example=True, max_pairs=10**6))


@pytest.mark.parametrize("command", ["validate", "sweep"])
def test_validate_and_sweep_refuse_it_before_anything_runs(command, tmp_path, capsys) -> None:
    raw = tiny_sweep(storage=str(tmp_path / "results"), grid={"seed": list(range(12))})
    raw["transfer"] = {"controls": ["knn"], "max_pairs": 100}
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main([command, str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "transfer.pairs: all over 12 trials makes 156 source-target pairs" in err
    assert "set transfer.pairs: sample with transfer.sample: 6 (96 pairs)" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        ({"pairs": "within"}, "pairs: within needs the keys"),
        ({"within": ["subset"]}, "applies to pairs: within or sample"),
        ({"pairs": "some"}, "pairs"),
        ({"pairs": "sample", "sample": 0}, "sample"),
        ({"pairs": "within", "within": ["subset", "subset"]}, "name each trial key once"),
    ],
)
def test_bad_pairs_settings_are_one_line(given, problem, tmp_path, capsys) -> None:
    raw = tiny_sweep(storage=str(tmp_path), transfer=given)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert problem in err and "transfer" in err and len(err.splitlines()) == 1
