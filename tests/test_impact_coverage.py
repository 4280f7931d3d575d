"""The impact estimators' 95% intervals cover the simulated truth, on a small seed set of benchmarks/impact_coverage.py
(`make bench` runs 200 seeds of every design). Each check also shows that intervals half as wide, from the same seeds,
would fail it, so the thresholds separate a correct method from a broken one."""
import pytest
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
from impact_coverage import coverage, expected_auroc, population_auroc  # noqa: E402


def halved(runs):
    "Coverage of the same seeds' intervals shrunk to half their width about their centre."
    est, lo, hi, truth = (np.array(v, dtype=float) for v in zip(*runs))
    mid, half = (lo + hi) / 2, (hi - lo) / 4
    return float(((mid - half <= truth) & (truth <= mid + half)).mean())


def check(c, name, min_coverage, se_ratio):
    row = next(r for r in c['rows'] if r['estimand'] == name)
    assert min_coverage <= row['coverage'] <= 1, row
    assert se_ratio[0] <= row['se_ratio'] <= se_ratio[1], row      # interval width matches the estimates' spread over seeds
    assert halved(c['runs'][name]) < min_coverage, (name, halved(c['runs'][name]))
    return row


@pytest.mark.slow
def test_itt_and_cace_intervals_cover_the_trial_truth():
    # 60 seeds: a correct 95% interval misses 10 or more with probability about 0.001; one half as wide covers ~67%
    c = coverage(seeds=60, designs=('iv',))
    for name in ('itt', 'cace'): check(c, name, 0.85, (0.7, 1.4))


@pytest.mark.slow
def test_rdd_and_weighted_auroc_intervals_cover_the_truth_where_the_naive_auroc_does_not():
    # 25 seeds: a correct interval misses 6 or more with probability about 0.001; the truth is the population AUROC
    # from 200,000 reference packets (Monte Carlo error about 0.0002, a fiftieth of the estimates' spread)
    c = coverage(seeds=25, designs=('rdd_sharp', 'auroc'), n_boot=200, auroc_truth=population_auroc(200_000))
    check(c, 'rdd_sharp', 0.8, (0.6, 1.6))
    check(c, 'auroc_weighted', 0.8, (0.6, 1.6))
    naive = next(r for r in c['rows'] if r['estimand'] == 'auroc_naive')
    assert naive['coverage'] <= 0.6, naive                          # the complete cases are biased: their intervals miss


def test_expected_auroc_is_the_population_auroc_of_a_calibrated_score():
    from cde_workbench.interventions import simulate_threshold_display
    s = np.random.default_rng(0).beta(2, 3, 300)
    pos_neg = np.outer(s, 1 - s); np.fill_diagonal(pos_neg, 0)       # expected (positive i, negative j) pairs, i != j
    assert abs(expected_auroc(s) - (pos_neg * (s[:, None] > s[None, :])).sum() / pos_neg.sum()) < 1e-12
    d, truth = simulate_threshold_display(200_000, seed=3)               # drawn labels agree, to their own noise (SE ~0.0016)
    assert abs(expected_auroc(d['score'].to_numpy()) - truth['auroc']) < 0.005
