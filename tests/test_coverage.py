"""The patient-level bootstrap holds its level where the row-level one under-covers (a small seed set of
benchmarks/coverage.py; `make bench` runs 200 seeds)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
from coverage import coverage, true_auroc  # noqa: E402


def test_patient_bootstrap_covers_where_row_bootstrap_does_not():
    c = coverage(seeds=30, patients=150, n_boot=300, truth=true_auroc(100_000))
    assert c['coverage']['patient'] >= 0.85, c
    assert c['coverage']['row'] <= c['coverage']['patient'] - 0.1, c
    assert c['mean_width']['patient'] > 1.3 * c['mean_width']['row'], c
