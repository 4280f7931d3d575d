"""The scoring run (nbs/41_serve `score_pending`) on its own, on a copy of the small trained store with the prospective HL7
feed: one packet per due order, scored at its order time by the served model with only what was stored by then; a repeat
run adds nothing; deployments that must not be scored are refused with a clear error."""
from dataclasses import replace
from datetime import datetime, timezone

import numpy as np
import pytest
import sqlalchemy as sa

from cde_workbench.config import ConfigError, PipelineError
from cde_workbench.deployment import Task
from cde_workbench.registry import display_threshold
from cde_workbench.schedule import run_ledger
from cde_workbench.serve import score_pending

SINCE = datetime(2024, 1, 1, tzinfo=timezone.utc)   # the year after the deployment's test years
AS_OF = datetime(2024, 2, 1, tzinfo=timezone.utc)


def q(engine, sql, **kw):
    with engine.connect() as c: return c.execute(sa.text(sql), kw).all()


def score(engine, dep, as_of):
    "A scoring run recorded in the run ledger, as the score notebook's caller records it; returns (summary, run id)."
    with run_ledger(engine, dep.name, 'score', {'as_of': as_of.isoformat()}) as run_id:
        return score_pending(engine, dep, as_of, run_id), run_id


def due(engine, as_of):
    "CBC orders placed since SINCE and stored by `as_of`, without a cancellation stored by then: counted straight from the tables."
    return q(engine, """select count(*) from lab_orders o where o.panel = 'CBC' and o.event_time >= :since and o.stored_time <= :as_of
                        and not exists (select 1 from lab_order_events e where e.order_id = o.order_id
                                        and e.control in ('CA', 'OC', 'DC') and e.stored_time <= :as_of)""",
             since=SINCE, as_of=as_of)[0][0]


def test_one_packet_per_due_order_at_its_order_time(silent_store):
    engine, dep, rec = silent_store
    s, run = score(engine, dep, AS_OF)
    n = due(engine, AS_OF)
    assert n > 20 and (s.candidates, s.scored, s.model_id) == (n, n, rec.model_id)
    rows = q(engine, 'select count(*), count(distinct order_id), min(score), max(score) from inferences')[0]
    assert rows[:2] == (n, n) and 0 <= rows[2] < rows[3] <= 1
    assert q(engine, """select count(*) from inferences i join lab_orders o using (order_id)
                        where i.prediction_time != o.event_time or o.event_time > :as_of""", as_of=AS_OF)[0][0] == 0
    assert q(engine, 'select distinct deployment, model_id, threshold, output_mode, run_id from inferences') == [
        (dep.name, rec.model_id, display_threshold(dep, rec).value, 'silent', run)]


def test_scores_use_only_what_was_stored_at_the_order_time(silent_store):
    "Rescoring the same orders with every fact the store now holds gives the same scores: nothing later leaked in, nothing missed."
    import polars as pl
    from cde_workbench.features import load_feature_data
    from cde_workbench.registry import load_bundle
    from cde_workbench.tasks import task_points
    engine, dep, rec = silent_store
    score(engine, dep, AS_OF)
    with engine.connect() as c:
        got = pl.DataFrame(q(engine, 'select order_id, score, n_features from inferences'), schema=['order_id', 'score', 'n_features'], orient='row')
        pts = task_points(c, dep.task, start=SINCE, end=AS_OF).filter(pl.col('order_id').is_in(got['order_id'].to_list()))
        data = load_feature_data(c, pts['patient_key'].unique().to_list())   # everything, including facts stored after AS_OF
    assert pts.height == got.height
    bundle = load_bundle(rec)
    X = bundle['featurizer'].transform(pts, data)
    again = pl.DataFrame({'order_id': pts['order_id'], 'again': bundle['estimator'].predict_proba(X)[:, 1], 'nnz': np.diff(X.indptr)})
    j = got.join(again, on='order_id')
    assert j.height == got.height
    np.testing.assert_allclose(j['score'].to_numpy(), j['again'].to_numpy(), rtol=0, atol=1e-12)
    assert (j['n_features'] == j['nnz']).all()


def test_a_repeat_run_adds_nothing_and_a_later_clock_only_the_new_orders(silent_store):
    engine, dep, rec = silent_store
    (first, run1), (again, _) = score(engine, dep, AS_OF), score(engine, dep, AS_OF)
    assert first.scored > 0 and (again.candidates, again.scored) == (0, 0)
    later = datetime(2024, 3, 1, tzinfo=timezone.utc)
    s, run3 = score(engine, dep, later)
    assert s.scored == due(engine, later) - first.scored > 0
    assert sorted(q(engine, 'select run_id, count(*) from inferences group by run_id')) == sorted([(run1, first.scored), (run3, s.scored)])
    assert q(engine, "select count(*) from inferences where run_id = :r and prediction_time <= :t", r=run3, t=AS_OF)[0][0] == 0


def test_deployments_that_must_not_be_scored_are_refused(silent_store):
    from cde_workbench.deploy import set_status
    engine, dep, rec = silent_store
    with pytest.raises(ConfigError, match=r"task kind 'event_within' is not served yet"):
        score_pending(engine, replace(dep, task=Task.from_dict({'kind': 'event_within', 'event_table': 'adt_events', 'event_filter': {'ward': 'ICU'},
                                                               'window_hours': 24, 'every_hours': 6})), AS_OF, 'run-x')
    with pytest.raises(PipelineError, match=r'predicts HGB, deployment wants PLT'):
        score_pending(engine, replace(dep, task=replace(dep.task, component='PLT')), AS_OF, 'run-x')
    set_status(engine, dep.name, 'paused', reason='test: paused')
    with pytest.raises(ConfigError, match=r"deployment 'hgb_abnormal' is paused; only silent or live deployments are scored"):
        score_pending(engine, dep, AS_OF, 'run-x')
    with pytest.raises(ConfigError, match=r"deployment 'other' is not registered"):
        score_pending(engine, replace(dep, name='other'), AS_OF, 'run-x')
    assert q(engine, 'select count(*) from inferences')[0][0] == 0   # nothing written by a refused run


def test_a_point_scored_live_is_the_packet_the_catch_up_run_would_have_written_and_is_not_scored_again(silent_store):
    "`score_point` (the live paths) and `score_pending` (the catch-up run) agree on every score, and neither scores an order twice."
    from cde_workbench.serve import score_point, serving_model
    import polars as pl
    from cde_workbench.tasks import task_points
    engine, dep, rec = silent_store
    with engine.connect() as c:
        pts = task_points(c, dep.task, start=SINCE, as_of=AS_OF)
    live = pts.head(12)
    with run_ledger(engine, dep.name, 'trigger', {}) as run:
        model = serving_model(engine, dep)
        packets = [score_point(engine, dep, patient_key=r['patient_key'], when=r['prediction_time'], order_id=r['order_id'], trigger='order',
                               run_id=run, model=model) for r in live.iter_rows(named=True)]
    assert all(p.created and p.trigger == 'order' and p.output_mode == 'silent' and not p.shown for p in packets)
    assert all(p.latency_ms > 0 and p.model_sha256 == rec.sha256 for p in packets)
    s, batch_run = score(engine, dep, AS_OF)
    assert s.scored == due(engine, AS_OF) - len(live)            # the catch-up run left the live packets alone
    import json
    stored = q(engine, 'select features, n_features from inferences')
    assert all(f is not None and len(json.loads(f)) == n for f, n in stored)   # both paths keep the features used, by name
    assert q(engine, 'select count(*), count(distinct order_id) from inferences')[0] == (due(engine, AS_OF),) * 2
    # the same orders through the batch path's transform (the facts stored by the run's clock; each row keeps what was known at its time)
    from cde_workbench.features import load_feature_data
    from cde_workbench.registry import load_bundle
    bundle = load_bundle(rec)
    with engine.connect() as c:
        X = bundle['featurizer'].transform(live, load_feature_data(c, live['patient_key'].unique().to_list(), as_of=AS_OF))
    np.testing.assert_allclose([p.score for p in packets], bundle['estimator'].predict_proba(X)[:, 1], rtol=0, atol=1e-12)
    assert [p.features and len(p.features) for p in packets] == np.diff(X.indptr).tolist()
    again = score_point(engine, dep, patient_key=live['patient_key'][0], when=live['prediction_time'][0], order_id=live['order_id'][0],
                        trigger='hook', run_id=run, request_id='hook-1')
    assert (again.created, again.inference_id, again.trigger) == (False, packets[0].inference_id, 'order')
