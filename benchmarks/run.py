"""Run every benchmark, print each figure with its same-run baseline and ratio, and write var/bench/latest.json.

Figures (each measured in this process, against a baseline measured in the same run):
- bootstrap_auroc: 1,000-resample AUROC bootstrap, n = 20,000, vectorised against a loop of
  sklearn.metrics.roc_auc_score over the same resample indices.
- cluster_bootstrap: the AUROC bootstrap resampling patients (20,000 predictions from 2,000 patients), against
  the row bootstrap on the same data.
- auroc_ci_coverage: coverage of the true AUROC by row- and patient-level 95% intervals over 200 simulated
  samples of correlated orders (benchmarks/coverage.py).
- count_features: point-in-time count features (the full transform to CSR, 20M events, 200k points) and its
  peak memory against a pandas merge-and-filter baseline, with events grouped by patient (as the store
  returns them) and, as count_features_ungrouped, in arbitrary order (the one-off sort counted).
- hl7_parse_extract: our HL7 parser extracting the processor's fields against python-hl7 (and hl7apy).
- replay_rebuild: 200,000 messages rebuilt from the immutable data store, against python-hl7's parse-only rate.
- mllp: live ingest over MLLP with 4 concurrent senders (benchmarks/mllp.py).
- model_score_p99_ms: one row scored by a 300-tree random forest compiled to ONNX (onnxruntime) against scikit-learn's
  predict_proba on the same rows (benchmarks/model_score.py).
- service_p99_ms: the scoring service end to end (CDS Hooks order-sign with a JWT each, features by the online path,
  score, packet), 50 calls/s for 60 s from a separate load process, against the same service scoring with plain
  scikit-learn (benchmarks/service.py).
- impact_coverage_*: coverage of the 95% intervals of the sharp and fuzzy RDD, the ITT (robust and clustered by
  clinician), the CACE and the AUROC weighted under label selection, over 200 simulated samples with known effects
  (benchmarks/impact_coverage.py); the weighted AUROC's baseline is the naive complete-case AUROC on the same samples.
- dashboard_render_seconds: first render of the deployment-health dashboard in Chromium (Voilà, kernel start included)
  with one year of packets for twelve deployments, against recomputing its figures from packets with run_monitoring
  (benchmarks/dashboard.py).
- demo stage timings: read from var/bench/demo_stages.json when `make demo` has run (no baseline:
  they are the demo's own wall times on this machine).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cde_workbench.config import Workspace, private_dir, private_file  # noqa: E402


def _bench_dir() -> Path:
    "Where `make demo` leaves its stage timings and this script its figures: the command line's var/bench."
    ws = Workspace.from_env()
    return private_dir(ws.var / 'bench', under=ws.var)   # var/ is the owner's only


def demo_stages():
    p = _bench_dir() / 'demo_stages.json'
    if not p.exists(): return {}
    d = json.loads(p.read_text())
    return {f'demo_{k}_seconds': {'value': v, 'unit': 's', 'baseline': None, 'ratio': None, 'note': f"make demo, {d['patients']} patients"}
            for k, v in d['seconds'].items()}


def main():
    from bootstrap import bench_bootstrap
    from coverage import bench_coverage
    from features import bench_count_features, bench_count_features_ungrouped
    from hl7_parse import bench_hl7_parse
    from impact_coverage import bench_impact_coverage
    from model_score import bench_model_score
    from replay import bench_replay
    benches = [bench_bootstrap, bench_coverage, bench_count_features, bench_count_features_ungrouped, bench_hl7_parse, bench_replay, bench_model_score,
               bench_impact_coverage]
    try:
        from mllp import bench_mllp
        benches.append(bench_mllp)
    except ImportError: pass
    from service import bench_service
    from dashboard import bench_dashboard
    benches += [bench_service, bench_dashboard]
    figures = {}
    # each figure is printed as soon as its benchmark ends, so a failure late in a long run loses none of the earlier ones
    for f in (*benches, demo_stages):
        new = f()
        figures.update(new)
        for name, v in new.items():
            ratio = f"  ratio {v['ratio']}x (baseline {v['baseline']} {v['unit']})" if v['ratio'] else ''
            print(f"{name:34s} {v['value']:>9} {v['unit']}{ratio}   [{v['note']}]", flush=True)
    out = _bench_dir() / 'latest.json'
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=1)); private_file(out)
    print(f'written: {out}')


if __name__ == '__main__':
    main()
