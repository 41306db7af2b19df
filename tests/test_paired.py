"""Paired differences to a baseline over seeds: the t-interval, the verdict it allows, pairing by seed."""

from __future__ import annotations

import math

import pytest

from bench.heterogeneity import paired_table
from bench.paired import paired_difference, t975


def test_the_interval_is_students_t_on_the_per_seed_differences():
    # differences 1, 2, 3: mean 2, sd 1, se 1/sqrt(3), t(0.975; 2) = 4.303
    diff = paired_difference([11.0, 22.0, 33.0], [10.0, 20.0, 30.0])
    half = 4.303 / math.sqrt(3)
    assert diff.n == 3 and diff.mean == pytest.approx(2.0)
    assert diff.low == pytest.approx(2.0 - half) and diff.high == pytest.approx(2.0 + half)
    assert diff.verdict == "no difference"  # the interval [-0.48, 4.48] holds 0
    assert t975(4) == 2.776 and t975(100) == 1.96


def test_pairing_removes_what_the_seeds_share():
    """Unpaired, these spreads overlap widely; paired, the method is better on every seed."""
    baseline = [0.30, 0.55, 0.80, 0.45, 0.62]
    method = [b + d for b, d in zip(baseline, [0.04, 0.05, 0.03, 0.05, 0.04], strict=True)]
    diff = paired_difference(method, baseline)
    assert diff.verdict == "better" and diff.low > 0.03
    assert paired_difference(baseline, method).verdict == "worse"
    assert diff.text().startswith("+0.042 [+0.")


def test_one_seed_gives_no_interval_and_a_stopped_grid_pairs_its_first_seeds():
    assert paired_difference([0.5], [0.4]).verdict == "too few seeds"
    assert paired_difference([0.5, 0.6], [0.4, 0.5, 0.9]).n == 2
    with pytest.raises(ValueError):
        paired_difference([], [0.4])


def test_the_heterogeneity_table_gives_each_methods_paired_difference():
    central = {"iid": {"fedavg": [0.5, 0.6, 0.7], "fedprox": [0.6, 0.7, 0.8], "fedbn": [0.4, 0.7, 0.7]}}
    lines = paired_table(central, "central", ["iid"], ["fedprox", "fedbn"], 3)
    assert lines[0].startswith("**central, paired difference to fedavg**")
    assert "| fedprox | +0.100 [+0.100, +0.100] better |" in lines
    assert any(line.startswith("| fedbn | +0.000 [") and "no difference" in line for line in lines)
