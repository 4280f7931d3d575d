"""The shared Synthea sample (59 patients) loaded into a fresh store, checked against the CSV files themselves."""
import os
import shutil
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest
import sqlalchemy as sa

from conftest import SHARED, needs_shared, env_key  # noqa: E402

SAMPLE = Path(os.environ.get('CDE_SYNTHEA_SAMPLE', SHARED / 'synthea'))
needs_shared(SAMPLE / 'patients.csv', 'Synthea sample (set CDE_SYNTHEA_SAMPLE to its folder)')


def _csv(name: str) -> pl.DataFrame:
    return pl.read_csv(SAMPLE / name, infer_schema=False)


def _utc(s: str) -> datetime:
    return datetime.fromisoformat(s.replace('Z', '+00:00')).astimezone(timezone.utc)


@pytest.fixture
def loaded(store_url, tmp_path, monkeypatch):
    "The sample loaded into a fresh store: (engine, counts)."
    monkeypatch.setenv('CDE_SITE_KEY_FILE', str(tmp_path / 'site.key'))
    from cde_workbench.store import dispose_engines, get_engine
    from cde_workbench.synthea import load_synthea
    eng = get_engine(store_url)
    counts = load_synthea(eng, SAMPLE, env_key())
    yield eng, counts
    dispose_engines()


def _table(eng, name: str) -> pl.DataFrame:
    from cde_workbench.store import metadata, read_frame
    with eng.connect() as c: return read_frame(c, sa.select(metadata.tables[name]))


def test_counts_match_the_csv_files(loaded):
    from cde_workbench.terminology import LABS, LOINC_REFERENCE, SNOMED_ICD10
    eng, counts = loaded
    enc = _csv('encounters.csv')
    hosp = enc.filter(pl.col('ENCOUNTERCLASS').is_in(['inpatient', 'emergency']))
    obs = _csv('observations.csv').filter(pl.col('CODE').is_in(list(LOINC_REFERENCE)))
    panel = {code: LABS[r.component].panel for code, r in LOINC_REFERENCE.items()}
    comp = {code: r.component for code, r in LOINC_REFERENCE.items()}
    # one order per patient, encounter, panel and draw time; a component repeated in it opens another
    groups = Counter()
    for g, rows in obs.with_columns(panel=pl.col('CODE').replace_strict(panel), comp=pl.col('CODE').replace_strict(comp)) \
                      .group_by('PATIENT', 'ENCOUNTER', 'panel', 'DATE'):
        groups[g] = max(Counter(rows['comp']).values())
    expected = {'patients': _csv('patients.csv').height,
                'adt_events': hosp.height + hosp['STOP'].drop_nulls().len(),
                'diagnoses': _csv('conditions.csv').filter(pl.col('CODE').is_in(list(SNOMED_ICD10))).height,
                'medication_orders': _csv('medications.csv').height,
                'lab_orders': sum(groups.values()),
                'lab_results': obs.height}
    assert counts == expected
    assert expected == {'patients': 59, 'adt_events': 384, 'diagnoses': 711, 'medication_orders': 1772,
                        'lab_orders': 346, 'lab_results': 1826}
    assert {k: _table(eng, k).height for k in counts} == counts


def test_values_match_the_csv_files(loaded):
    from cde_workbench.pseudonyms import patient_key
    from cde_workbench.synthea import RESULT_TURNAROUND
    from cde_workbench.terminology import LOINC_REFERENCE
    eng, _ = loaded
    res = _table(eng, 'lab_results')
    obs = _csv('observations.csv').filter(pl.col('CODE').is_in(list(LOINC_REFERENCE)))
    want = Counter((patient_key(p, env_key()), code, _utc(t), float(v)) for p, code, t, v in obs.select('PATIENT', 'CODE', 'DATE', 'VALUE').rows())
    got = Counter(res.select('patient_key', 'loinc', 'event_time', 'value').rows())
    assert got == want
    assert (res['stored_time'] - res['event_time'] == RESULT_TURNAROUND).all()
    assert set(res['component']) == {r.component for r in LOINC_REFERENCE.values()}
    assert (res.filter(pl.col('loinc') == '38483-4')['component'] == 'CREAT').all()    # whole-blood creatinine is creatinine
    sex = {patient_key(i, env_key()): g for i, g in _csv('patients.csv').select('Id', 'GENDER').rows()}
    hgb = res.filter(pl.col('component') == 'HGB').with_columns(sex=pl.col('patient_key').replace_strict(sex))
    assert set(hgb.filter(pl.col('sex') == 'M').select('ref_low', 'ref_high').rows()) == {(13.5, 17.5)}
    assert set(hgb.filter(pl.col('sex') == 'F').select('ref_low', 'ref_high').rows()) == {(12.0, 15.5)}
    flags = res.select(pl.when(pl.col('value') < pl.col('ref_low')).then(pl.lit('L')).when(pl.col('value') > pl.col('ref_high'))
                       .then(pl.lit('H')).otherwise(pl.lit('N')).alias('f'), 'abnormal_flag')
    assert (flags['f'] == flags['abnormal_flag']).all()

    meds = _table(eng, 'medication_orders')
    want = Counter((patient_key(p, env_key()), f'RXNORM:{c}', _utc(t)) for p, c, t in _csv('medications.csv').select('PATIENT', 'CODE', 'START').rows())
    assert Counter(meds.select('patient_key', 'med_code', 'event_time').rows()) == want

    adt = _table(eng, 'adt_events')
    a01 = adt.filter(pl.col('event_type') == 'A01')
    assert Counter(a01['ward']) == Counter({'INPATIENT': 92, 'ED': 98, 'ICU': 2})
    enc = _csv('encounters.csv').filter(pl.col('ENCOUNTERCLASS').is_in(['inpatient', 'emergency']))
    assert set(a01['encounter_id']) == {i.replace('-', '') for i in enc['Id']}

    for name in ('adt_events', 'diagnoses', 'medication_orders', 'lab_orders', 'lab_results'):
        t = _table(eng, name)
        assert (t['stored_time'] >= t['event_time']).all(), name
        assert (t['source'] == 'synthea').all(), name


def test_diagnoses_are_coded_at_the_end_of_their_visit(loaded):
    from cde_workbench.pseudonyms import patient_key
    eng, _ = loaded
    dx = _table(eng, 'diagnoses')
    assert dx['icd10'].null_count() == 0 and 'I10' in set(dx['icd10'])
    stop = {i.replace('-', ''): _utc(t) for i, t in _csv('encounters.csv').select('Id', 'STOP').rows()}
    late = [(stop[e], s) for e, s in dx.select('encounter_id', 'stored_time').rows() if s != stop[e]]
    # a few social findings are dated days after the visit that lists them: known at the end of that day
    assert len(late) == 5 and all(s > t and s.hour == 0 for t, s in late)
    # the sample's hypertension diagnoses, one per patient who has one
    htn = _csv('conditions.csv').filter(pl.col('CODE') == '59621000')
    assert Counter(dx.filter(pl.col('icd10') == 'I10')['patient_key']) == Counter(patient_key(p, env_key()) for p in htn['PATIENT'])


def test_no_identifiers_reach_the_research_tables(loaded):
    eng, _ = loaded
    pts = _csv('patients.csv')
    secrets = set(pts['Id']) | set(pts['FIRST']) | set(pts['LAST']) | set(pts['SSN']) | set(pts['BIRTHDATE']) | set(pts['ADDRESS'])
    for name in ('patients', 'adt_events', 'diagnoses', 'medication_orders', 'lab_orders', 'lab_results'):
        t = _table(eng, name)
        text = {v for c in t.columns if t.schema[c] == pl.String for v in t[c].drop_nulls()}
        assert not text & secrets, name
    p = _table(eng, 'patients')
    assert set(p['race_ethnicity']) <= {'White', 'Black', 'Asian', 'Hispanic', 'Other', 'Unknown'}
    assert sorted(p['birth_year']) == sorted(int(b[:4]) for b in pts['BIRTHDATE'])


def test_second_load_is_a_no_op_and_the_audit_row_has_the_coverage(loaded):
    import json
    from cde_workbench.store import audit_log
    from cde_workbench.synthea import load_synthea
    eng, counts = loaded
    assert load_synthea(eng, SAMPLE, env_key()) == {}
    with eng.connect() as c:
        rows = c.execute(sa.select(audit_log.c.detail).where(audit_log.c.action == 'synthea.load')).scalars().all()
    assert len(rows) == 1
    detail = json.loads(rows[0])
    assert (detail['conditions'], detail['conditions_mapped'], detail['lab_observations']) == (1534, 711, 1826)
    assert detail['conditions_unmapped']['160903007'] == 408 and detail['rows'] == counts


def test_an_edited_copy_of_a_loaded_export_is_refused_whole(loaded, tmp_path):
    from cde_workbench.config import IngestError
    from cde_workbench.synthea import load_synthea
    eng, counts = loaded
    copy = tmp_path / 'edited'
    shutil.copytree(SAMPLE, copy)
    with open(copy / 'medications.csv', 'a') as f:   # one more prescription: a new fingerprint, the rest already stored
        f.write(open(SAMPLE / 'medications.csv').read().splitlines()[1] + '\n')
    with pytest.raises(IngestError, match='already in the store'):
        load_synthea(eng, copy, env_key())
    assert {k: _table(eng, k).height for k in counts} == counts


def test_a_bad_value_in_the_sample_is_named_and_nothing_is_loaded(tmp_path, monkeypatch):
    from cde_workbench.config import SchemaError
    from cde_workbench.store import dispose_engines, get_engine
    from cde_workbench.synthea import load_synthea
    monkeypatch.setenv('CDE_SITE_KEY_FILE', str(tmp_path / 'site.key'))
    copy = tmp_path / 'bad'
    shutil.copytree(SAMPLE, copy)
    lines = (copy / 'observations.csv').read_text().splitlines(keepends=True)
    i = next(n for n, line in enumerate(lines) if ',718-7,' in line)
    parts = lines[i].split(',')   # DATE,PATIENT,ENCOUNTER,CATEGORY,CODE,DESCRIPTION,VALUE,UNITS,TYPE
    parts[6] = 'n/a'
    lines[i] = ','.join(parts)
    (copy / 'observations.csv').write_text(''.join(lines))
    eng = get_engine(f'sqlite:///{tmp_path}/s.sqlite')
    with pytest.raises(SchemaError, match=rf"observations.csv: row {i}, column VALUE: 'n/a' is not a number"):
        load_synthea(eng, copy, env_key())
    with eng.connect() as c:
        assert c.execute(sa.text('select count(*) from lab_results')).scalar() == 0
    dispose_engines()


def test_the_same_patient_read_as_fhir_gets_the_same_keys_ids_and_values(tmp_path, monkeypatch):
    "One sample patient written as a FHIR bundle (as Synthea's FHIR export would) gives the same rows as the CSV."
    import json
    from cde_workbench.fhir import LOINC_SYSTEM, read_fhir_bundles
    from cde_workbench.synthea import read_synthea
    from cde_workbench.terminology import LOINC_REFERENCE
    monkeypatch.setenv('CDE_SITE_KEY_FILE', str(tmp_path / 'site.key'))
    obs = _csv('observations.csv').filter(pl.col('CODE').is_in(list(LOINC_REFERENCE)))
    pid = obs['PATIENT'].value_counts(sort=True)['PATIENT'][0]         # the patient with the most labs
    pt = _csv('patients.csv').filter(pl.col('Id') == pid).row(0, named=True)
    enc = _csv('encounters.csv').filter(pl.col('PATIENT') == pid)
    res = [{'resourceType': 'Patient', 'id': pid, 'birthDate': pt['BIRTHDATE'], 'gender': {'M': 'male', 'F': 'female'}[pt['GENDER']],
            'identifier': [{'type': {'coding': [{'code': 'MR'}]}, 'value': pid}]}]
    classes = {'inpatient': 'IMP', 'emergency': 'EMER'}
    res += [{'resourceType': 'Encounter', 'id': e['Id'], 'status': 'finished', 'class': {'code': classes.get(e['ENCOUNTERCLASS'], 'AMB')},
             'type': [{'coding': [{'system': 'http://snomed.info/sct', 'code': e['CODE']}]}], 'subject': {'reference': f'urn:uuid:{pid}'},
             'period': {'start': e['START'], 'end': e['STOP']}} for e in enc.iter_rows(named=True)]
    res += [{'resourceType': 'Observation', 'id': f'o{i}', 'status': 'final', 'code': {'coding': [{'system': LOINC_SYSTEM, 'code': o['CODE']}]},
             'subject': {'reference': f'urn:uuid:{pid}'}, 'encounter': {'reference': f"urn:uuid:{o['ENCOUNTER']}"},
             'effectiveDateTime': o['DATE'], 'issued': o['DATE'], 'valueQuantity': {'value': float(o['VALUE']), 'unit': o['UNITS']}}
            for i, o in enumerate(obs.filter(pl.col('PATIENT') == pid).iter_rows(named=True))]
    bundle = tmp_path / 'patient.json'
    bundle.write_text(json.dumps({'resourceType': 'Bundle', 'type': 'transaction',
                                  'entry': [{'fullUrl': f"urn:uuid:{r['id']}", 'resource': r} for r in res]}))
    fhir = read_fhir_bundles([bundle], env_key())
    csv = read_synthea(SAMPLE, env_key())
    key = fhir['patients']['patient_key'][0]
    mine = lambda t: csv[t].filter(pl.col('patient_key') == key)
    cols = ['patient_key', 'birth_year', 'sex', 'stored_time']
    assert fhir['patients'].select(cols).equals(mine('patients').select(cols))
    assert fhir['adt_events'].sort('event_time', 'event_type').equals(mine('adt_events').sort('event_time', 'event_type'))
    assert fhir['lab_orders'].sort('order_id').equals(mine('lab_orders').sort('order_id'))
    assert fhir['lab_results'].sort('order_id', 'component').equals(mine('lab_results').sort('order_id', 'component'))
