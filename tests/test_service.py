"""The scoring service (nbs/41a_service, `cde serve`) on a copy of the small trained store with the prospective feed:
REST scoring with bearer tokens, CDS Hooks discovery and calls with JWTs (every misuse refused), idempotent retries,
fuzzed input answered 4xx in one line, ten times the target load answered 503 with Retry-After and one packet per
accepted request, the store going away and coming back (PostgreSQL), and SIGTERM ending `cde serve` and freeing its port."""
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import jwt
import psutil
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from conftest import CDE, ROOT, SMALL_DEPLOYMENT, env_engine, free_port

ISS = 'https://ehr.example.org'
HOOK_DEP = 'hgb_hook'


# ---------------------------------------------------------------------------------------------------------------------
# set-up: a hook deployment beside hgb_abnormal, settings with a token and an issuer, keys made here

def _jwks(key, kid: str, alg: str) -> dict:
    pub = key.public_key()
    algo = jwt.algorithms.RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else jwt.algorithms.ECAlgorithm
    return {**json.loads(algo.to_jwk(pub)), 'kid': kid, 'use': 'sig', 'alg': alg}


@pytest.fixture(scope='module')
def keys():
    "The EHR's signing keys (RSA and EC) and a stranger's key with the same kid."
    return {'rsa': rsa.generate_private_key(public_exponent=65537, key_size=2048), 'ec': ec.generate_private_key(ec.SECP256R1()),
            'stranger': rsa.generate_private_key(public_exponent=65537, key_size=2048)}


def write_hook_deployment(base: Path, mode: str = 'live') -> None:
    "A copy of hgb_abnormal answering CDS Hooks order-sign and patient-view, shown in `mode`."
    src = (base / 'deployments' / SMALL_DEPLOYMENT / 'deployment.toml').read_text()
    toml = src.replace(f'name = "{SMALL_DEPLOYMENT}"', f'name = "{HOOK_DEP}"')
    toml = re.sub(r'\[trigger\]\nkind = "order"[^\n]*', '[trigger]\nkind = "hook"\nhooks = ["order-sign", "patient-view"]', toml)
    toml = re.sub(r'mode = "threshold"[^\n]*', f'mode = "{mode}"', toml)
    toml = re.sub(r'\[writeback\][^\[]*', '', toml)
    assert 'kind = "hook"' in toml and f'mode = "{mode}"' in toml
    (base / 'deployments' / HOOK_DEP).mkdir()
    (base / 'deployments' / HOOK_DEP / 'deployment.toml').write_text(toml)


def set_state(engine, name: str, status: str, model_id: int) -> None:
    """Put a deployment in a lifecycle state directly: the lifecycle and its gates are tested elsewhere, here only what the
    service does in each state matters."""
    from cde_workbench.config import utcnow
    from cde_workbench.store import deployments
    with engine.begin() as c:
        if c.execute(sa.select(deployments.c.name).where(deployments.c.name == name)).first() is None:
            c.execute(deployments.insert().values(name=name, status=status, model_id=model_id, updated_at=utcnow()))
        else: c.execute(deployments.update().where(deployments.c.name == name).values(status=status, model_id=model_id))


@pytest.fixture
def service_store(silent_store, small_store, keys):
    "The small store, hgb_abnormal silent, hgb_hook live, settings with API token and the EHR as JWT issuer: a dict."
    from cde_workbench.config import Workspace
    from cde_workbench.service import ServiceSettings, add_token, save_settings, settings_path
    engine, dep, rec = silent_store
    write_hook_deployment(small_store.base)
    set_state(engine, HOOK_DEP, 'live', rec.model_id)
    ws = Workspace.from_env()
    jwks = small_store.base / 'ehr-jwks.json'
    jwks.write_text(json.dumps({'keys': [_jwks(keys['rsa'], 'ehr-rsa', 'RS256'), _jwks(keys['ec'], 'ehr-ec', 'ES256'),
                                         {'kty': 'oct', 'kid': 'ehr-oct', 'k': 'c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0'}]}))
    path = settings_path(ws)
    port = free_port()
    save_settings(ServiceSettings(port=port, issuers={ISS: jwks}, max_in_flight=8), path)
    token = add_token(path, 'ehr')
    with engine.connect() as c:
        pks = [r[0] for r in c.execute(sa.text('select patient_key from patients order by patient_key limit 40'))]
    return {'engine': engine, 'dep': dep, 'rec': rec, 'ws': ws, 'token': token, 'port': port, 'patients': pks,
            'settings_path': path, 'store': small_store, 'audience': f'http://127.0.0.1:{port}/cds-services'}


def client(s):
    "An in-process client of the app (FastAPI TestClient) for the store `s`."
    from fastapi.testclient import TestClient
    from cde_workbench.service import create_app, load_settings
    return TestClient(create_app(s['ws'], load_settings(s['settings_path'])), raise_server_exceptions=False)


def hook_jwt(key, kid='ehr-rsa', alg='RS256', headers=None, drop=(), **claims) -> str:
    now = int(time.time())
    c = {'iss': ISS, 'aud': claims.pop('aud'), 'iat': now, 'exp': now + 120, 'jti': uuid.uuid4().hex, **claims}
    for k in drop: c.pop(k)
    return jwt.encode(c, key, algorithm=alg, headers={'kid': kid, **(headers or {})})


def order_sign(patient: str, order_id: str, instance: str | None = None, prefetch: bool = True) -> dict:
    body = {'hook': 'order-sign', 'hookInstance': instance or str(uuid.uuid4()), 'fhirServer': 'https://ehr.example.org/fhir',
            'context': {'userId': 'Practitioner/1', 'patientId': patient,
                        'draftOrders': {'resourceType': 'Bundle', 'entry': [
                            {'resource': {'resourceType': 'ServiceRequest', 'id': order_id, 'status': 'draft', 'intent': 'order',
                                          'code': {'text': 'CBC with differential'}, 'subject': {'reference': f'Patient/{patient}'}}}]}}}
    if prefetch: body['prefetch'] = {'patient': {'resourceType': 'Patient', 'id': patient}}
    return body


def packets(engine, **where) -> int:
    cond = ' and '.join(f'{k} = :{k}' for k in where) or '1=1'
    with engine.connect() as c: return c.execute(sa.text(f'select count(*) from inferences where {cond}'), where).scalar()


def one_line_error(r, status, *needles):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()['error']
    assert isinstance(err, str) and '\n' not in err and err, r.text
    for n in needles: assert n in err, (n, err)
    return err


# ---------------------------------------------------------------------------------------------------------------------
# REST

def test_rest_scores_once_per_request_and_refuses_what_it_must(service_store):
    s = service_store
    eng, pk = s['engine'], s['patients'][0]
    auth = {'Authorization': f"Bearer {s['token']}"}
    with client(s) as c:
        r = c.post(f'/v1/deployments/{SMALL_DEPLOYMENT}/score', json={'patient_key': pk, 'request_id': 'req-1', 'ward': 'MED1'}, headers=auth)
        assert r.status_code == 200, r.text
        a = r.json()
        assert 0 <= a['score'] <= 1 and a['shown'] is False and a['output_mode'] == 'silent' and a['created'] is True
        assert a['model'] == {'name': s['rec'].name, 'version': s['rec'].version, 'sha256': s['rec'].sha256}
        assert a['threshold'] > 0 and isinstance(a['packet_id'], int) and a['decision'] == (a['score'] >= a['threshold'])
        again = c.post(f'/v1/deployments/{SMALL_DEPLOYMENT}/score', json={'patient_key': pk, 'request_id': 'req-1', 'ward': 'MED1'}, headers=auth).json()
        assert {k: v for k, v in again.items() if k != 'created'} == {k: v for k, v in a.items() if k != 'created'} and again['created'] is False
        assert packets(eng, request_id='req-1') == 1 and packets(eng, trigger='api') == 1
        # the same request id for another patient is a conflict, not a second packet
        one_line_error(c.post(f'/v1/deployments/{SMALL_DEPLOYMENT}/score', json={'patient_key': s['patients'][1], 'request_id': 'req-1'}, headers=auth),
                       409, 'req-1')
        # an order named by the caller is the scored point
        r = c.post(f'/v1/deployments/{SMALL_DEPLOYMENT}/score', json={'patient_key': pk, 'order_id': 'API-ORDER-1'}, headers=auth)
        assert r.status_code == 200 and r.json()['order_id'] == 'API-ORDER-1'
        # credentials
        body = {'patient_key': pk}
        one_line_error(c.post(f'/v1/deployments/{SMALL_DEPLOYMENT}/score', json=body), 401, 'missing bearer token')
        one_line_error(c.post(f'/v1/deployments/{SMALL_DEPLOYMENT}/score', json=body, headers={'Authorization': 'Bearer ' + 'x' * 43}), 401, 'refused')
        one_line_error(c.post(f'/v1/deployments/{SMALL_DEPLOYMENT}/score', json=body, headers={'Authorization': 'Bearer short'}), 401, 'refused')
        one_line_error(c.post(f'/v1/deployments/{SMALL_DEPLOYMENT}/score', json=body, headers={'Authorization': s['token']}), 401)
        assert c.post(f'/v1/deployments/{SMALL_DEPLOYMENT}/score', json=body).headers['www-authenticate'] == 'Bearer'
        # what is not there, what is malformed, what cannot score
        one_line_error(c.post('/v1/deployments/no_such_model/score', json=body, headers=auth), 404, "unknown deployment 'no_such_model'")
        one_line_error(c.post(f'/v1/deployments/{SMALL_DEPLOYMENT}/score', json={'patient_key': 'NOBODY'}, headers=auth), 404, "'NOBODY'")
        one_line_error(c.post(f'/v1/deployments/{SMALL_DEPLOYMENT}/score', json={'patient': pk}, headers=auth), 422, 'patient_key', 'patient')
        one_line_error(c.post(f'/v1/deployments/{SMALL_DEPLOYMENT}/score', content=b'{"patient_key": ', headers=auth), 422, 'JSON')
        one_line_error(c.post(f'/v1/deployments/{SMALL_DEPLOYMENT}/score', json={'patient_key': pk, 'order_id': 'x' * 33}, headers=auth), 422, 'order_id')
        set_state(eng, SMALL_DEPLOYMENT, 'paused', s['rec'].model_id)
        one_line_error(c.post(f'/v1/deployments/{SMALL_DEPLOYMENT}/score', json=body, headers=auth), 409, 'paused')
        one_line_error(c.get('/v1/nothing'), 404, 'no such path')
    assert packets(eng) == 2


# ---------------------------------------------------------------------------------------------------------------------
# CDS Hooks

def test_discovery_lists_each_hook_of_hook_deployments(service_store):
    with client(service_store) as c:
        r = c.get('/cds-services')
    assert r.status_code == 200
    got = {x['id']: x for x in r.json()['services']}
    assert set(got) == {f'{HOOK_DEP}-order-sign', f'{HOOK_DEP}-patient-view'}   # hgb_abnormal is order-triggered: not a service
    for hook in ('order-sign', 'patient-view'):
        x = got[f'{HOOK_DEP}-{hook}']
        assert x['hook'] == hook and x['title'] and x['description'] and x['prefetch'] == {'patient': 'Patient/{{context.patientId}}'}


def test_hooks_answer_cards_as_the_mode_decides_once_per_hook_instance(service_store, keys):
    s = service_store
    eng, aud = s['engine'], s['audience']
    pk = s['patients'][2]
    sign = lambda **kw: {'Authorization': 'Bearer ' + hook_jwt(keys['rsa'], aud=aud, **kw)}
    with client(s) as c:
        body = order_sign(pk, 'ORD-HOOK-1')
        r = c.post(f'/cds-services/{HOOK_DEP}-order-sign', json=body, headers=sign())
        assert r.status_code == 200, r.text
        cards = r.json()['cards']
        assert len(cards) == 1   # live mode: shown
        card = cards[0]
        assert len(card['summary']) <= 140 and card['indicator'] in ('info', 'warning') and 'HGB' in card['summary']
        assert card['source']['label'].endswith(f"{s['rec'].name} v{s['rec'].version}") and 'reference range' in card['detail']
        # a retried hookInstance (a new JWT, as the client must send) gets the same cards and stores nothing new
        r2 = c.post(f'/cds-services/{HOOK_DEP}-order-sign', json=body, headers=sign())
        assert r2.json() == r.json()
        assert packets(eng, request_id=body['hookInstance']) == 1 and packets(eng, order_id='ORD-HOOK-1', trigger='hook') == 1
        # an EC-signed call, patient-view, no prefetch: the store is asked
        ec_auth = {'Authorization': 'Bearer ' + hook_jwt(keys['ec'], kid='ehr-ec', alg='ES256', aud=f'{aud}/{HOOK_DEP}-patient-view')}
        pv = {'hook': 'patient-view', 'hookInstance': str(uuid.uuid4()), 'context': {'userId': 'Practitioner/1', 'patientId': pk}}
        r = c.post(f'/cds-services/{HOOK_DEP}-patient-view', json=pv, headers=ec_auth)
        assert r.status_code == 200 and len(r.json()['cards']) == 1, r.text
        with eng.connect() as q:
            oid = q.execute(sa.text('select order_id from inferences where request_id = :r'), {'r': pv['hookInstance']}).scalar()
        assert oid.startswith('pv:') and len(oid) <= 32
        # silent: a packet, no card
        set_state(eng, HOOK_DEP, 'silent', s['rec'].model_id)
        body = order_sign(pk, 'ORD-HOOK-2')
        r = c.post(f'/cds-services/{HOOK_DEP}-order-sign', json=body, headers=sign())
        assert r.status_code == 200 and r.json() == {'cards': []}
        with eng.connect() as q:
            row = q.execute(sa.text('select shown, output_mode, trigger from inferences where order_id = :o'), {'o': 'ORD-HOOK-2'}).one()
        assert tuple(row) == (False, 'silent', 'hook')
        # bad bodies
        one_line_error(c.post(f'/cds-services/{HOOK_DEP}-order-sign', json={**body, 'hook': 'patient-view'}, headers=sign()), 400, 'does not match')
        one_line_error(c.post(f'/cds-services/{HOOK_DEP}-order-sign', json={**body, 'context': {'patientId': pk}}, headers=sign()), 400, 'draftOrders')
        one_line_error(c.post(f'/cds-services/{HOOK_DEP}-order-sign', json={**body, 'context': {}}, headers=sign()), 400, 'patientId')
        one_line_error(c.post(f'/cds-services/{HOOK_DEP}-order-sign', json={k: v for k, v in body.items() if k != 'hookInstance'}, headers=sign()),
                       422, 'hookInstance')
        wrong = {**order_sign(pk, 'ORD-HOOK-3'), 'prefetch': {'patient': {'resourceType': 'Patient', 'id': 'SOMEONE-ELSE'}}}
        one_line_error(c.post(f'/cds-services/{HOOK_DEP}-order-sign', json=wrong, headers=sign()), 400, 'prefetch.patient')
        one_line_error(c.post(f'/cds-services/{HOOK_DEP}-order-sign', json=order_sign('NOBODY', 'ORD-HOOK-4', prefetch=False), headers=sign()),
                       404, "'NOBODY'")
        one_line_error(c.post(f'/cds-services/{SMALL_DEPLOYMENT}-order-sign', json=body, headers=sign()), 404, 'unknown CDS service')
        one_line_error(c.post('/cds-services/nothing', json=body, headers=sign()), 404, 'unknown CDS service')
    assert packets(eng, trigger='hook') == 3


def test_every_jwt_misuse_is_refused_with_401(service_store, keys):
    s = service_store
    aud, rsa_key = s['audience'], keys['rsa']
    secret = 'a-long-shared-secret-that-must-never-be-accepted-' + 'x' * 40
    now = int(time.time())
    reused = hook_jwt(rsa_key, aud=aud)
    cases = {
        'alg none': (jwt.encode({'iss': ISS, 'aud': aud, 'iat': now, 'exp': now + 60, 'jti': 'n1'}, None, algorithm='none',
                                headers={'kid': 'ehr-rsa'}), "'none'"),
        'HS256': (hook_jwt(secret, alg='HS256', aud=aud), 'HMAC'),
        'HS384': (hook_jwt(secret, alg='HS384', aud=aud), 'HMAC'),
        'HS512': (hook_jwt(secret, alg='HS512', aud=aud), 'HMAC'),
        'HS256 with the oct key of the JWKS': (hook_jwt(b'secret-secret-secret-secret'.ljust(32, b'!'), kid='ehr-oct', alg='HS256', aud=aud), 'HMAC'),
        'wrong aud': (hook_jwt(rsa_key, aud='https://other.example.org/cds-services'), 'aud'),
        'expired': (hook_jwt(rsa_key, aud=aud, iat=now - 600, exp=now - 300), 'expired'),
        'too long a lifetime': (hook_jwt(rsa_key, aud=aud, exp=now + 3600), '5 minutes'),
        'no exp': (hook_jwt(rsa_key, aud=aud, drop=('exp',)), 'exp'),
        'no iat': (hook_jwt(rsa_key, aud=aud, drop=('iat',)), 'iat'),
        'no jti': (hook_jwt(rsa_key, aud=aud, drop=('jti',)), 'jti'),
        'no iss': (hook_jwt(rsa_key, aud=aud, drop=('iss',)), 'iss'),
        'issuer not allowed': (hook_jwt(rsa_key, aud=aud, iss='https://evil.example.org'), 'not allowed'),
        'unknown kid': (hook_jwt(rsa_key, kid='other', aud=aud), "kid 'other'"),
        'no kid': (jwt.encode({'iss': ISS, 'aud': aud, 'iat': now, 'exp': now + 60, 'jti': 'k0'}, rsa_key, algorithm='RS256'), 'no kid'),
        'signed by a stranger': (hook_jwt(keys['stranger'], aud=aud), 'signature'),
        'key of the wrong type for alg': (hook_jwt(rsa_key, kid='ehr-ec', aud=aud), 'does not fit'),
        'alg other than the JWKS names': (hook_jwt(rsa_key, alg='RS512', aud=aud), 'does not fit'),
        'not a JWT': ('not-a-jwt', 'not a JWT'),
        'garbage': ('eyJhbGciOi.' + 'A' * 40 + '.x', 'JWT'),
    }
    with client(s) as c:
        url = f'/cds-services/{HOOK_DEP}-order-sign'
        ok = c.post(url, json=order_sign(s['patients'][3], 'ORD-JWT-0'), headers={'Authorization': f'Bearer {reused}'})
        assert ok.status_code == 200, ok.text
        cases['jti reused'] = (reused, 'already used')
        for what, (token, needle) in cases.items():
            r = c.post(url, json=order_sign(s['patients'][3], 'ORD-JWT-1'), headers={'Authorization': f'Bearer {token}'})
            assert r.status_code == 401, (what, r.status_code, r.text)
            err = r.json()['error']
            assert '\n' not in err and needle in err, (what, err)
        one_line_error(c.post(url, json=order_sign(s['patients'][3], 'ORD-JWT-1')), 401, 'missing JWT')
        # an API token is not a JWT
        one_line_error(c.post(url, json=order_sign(s['patients'][3], 'ORD-JWT-1'), headers={'Authorization': f"Bearer {s['token']}"}), 401)
    assert packets(s['engine'], order_id='ORD-JWT-1') == 0 and packets(s['engine'], trigger='hook') == 1
    with s['engine'].connect() as q:
        assert q.execute(sa.text('select count(*) from token_uses where issuer = :i'), {'i': ISS}).scalar() == 1


def test_fuzzed_ids_bodies_and_tokens_get_a_one_line_4xx(service_store, keys):
    s = service_store
    rng = random.Random(10)
    auth = {'Authorization': f"Bearer {s['token']}"}
    junk = lambda n: ''.join(rng.choice('aZ09 _-./\\\'"%\x00\x1b\n\u00e9\u202e{}[]<>') for _ in range(n))
    names = [junk(rng.randint(1, 70)) for _ in range(20)] + ['..', '%2e%2e', 'hgb_abnormal ', 'HGB_ABNORMAL', 'x' * 500]
    bodies = [rng.randbytes(rng.randint(0, 200)) for _ in range(20)] + [b'[]', b'null', b'1', b'"x"', b'{"patient_key": 5}',
              b'{"patient_key": null}', b'{"patient_key": ["a"]}', json.dumps({'patient_key': junk(10)}).encode(),
              json.dumps({'patient_key': 'a' * 1000}).encode(), b'{"patient_key": "P1", "request_id": {"a": 1}}', b'{' * 5000]
    tokens = [junk(rng.randint(0, 80)) for _ in range(15)] + ['Bearer', 'Bearer ' + 'A' * 10000, 'Basic dXNlcjpwYXNz']
    seen = []
    with client(s) as c:
        for n in names:
            r = c.post(f'/v1/deployments/{quote(n, safe="")}/score', json={'patient_key': s['patients'][0]}, headers=auth); seen.append(r)
        for b in bodies:
            r = c.post(f'/v1/deployments/{SMALL_DEPLOYMENT}/score', content=b, headers={**auth, 'Content-Type': 'application/json'}); seen.append(r)
            r = c.post(f'/cds-services/{HOOK_DEP}-patient-view', content=b,
                       headers={'Authorization': 'Bearer ' + hook_jwt(keys['rsa'], aud=s['audience']), 'Content-Type': 'application/json'}); seen.append(r)
        for t in tokens:
            t = t.replace('\n', ' ').replace('\x00', ' ').encode('utf-8')   # raw header bytes, UTF-8 included
            for url in (f'/v1/deployments/{SMALL_DEPLOYMENT}/score', f'/cds-services/{HOOK_DEP}-patient-view'):
                r = c.post(url, json={'patient_key': s['patients'][0]}, headers={'Authorization': t}); seen.append(r)
        for sid in names[:10]:
            r = c.post(f'/cds-services/{quote(sid, safe="")}', json={}, headers=auth); seen.append(r)
    for r in seen:
        assert 400 <= r.status_code < 500, (r.request.url, r.status_code, r.text[:300])
        if r.status_code != 405:
            err = r.json()['error']
            assert isinstance(err, str) and err and '\n' not in err and '\x1b' not in err, r.text[:300]
    assert packets(s['engine']) == 0


# ---------------------------------------------------------------------------------------------------------------------
# the real server: overload, SIGTERM, the store going away

@contextmanager
def cde_serve(env: dict, port: int, *args, timeout: float = 60):
    "`cde serve --port PORT` in its own process group; yields the process once /healthz answers; SIGTERM on exit."
    import httpx
    proc = subprocess.Popen([*CDE, 'serve', '--port', str(port), *args], env={**os.environ, **env}, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, 'cde serve did not answer in time'
            try:
                if httpx.get(f'http://127.0.0.1:{port}/healthz', timeout=1).status_code == 200: break
            except httpx.TransportError: time.sleep(0.2)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try: proc.wait(20)
            except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL); proc.wait()


def port_free(port: int) -> bool:
    with socket.socket() as so:
        try: so.bind(('127.0.0.1', port)); return True
        except OSError: return False


@pytest.mark.slow
@pytest.mark.parametrize('workers', [1, 2])
def test_sigterm_ends_cde_serve_and_frees_its_port(service_store, workers):
    import httpx
    s = service_store
    with cde_serve(s['store'].env, s['port'], '--workers', str(workers)) as proc:
        assert not port_free(s['port'])
        r = httpx.post(f"http://127.0.0.1:{s['port']}/v1/deployments/{SMALL_DEPLOYMENT}/score", json={'patient_key': s['patients'][0]},
                       headers={'Authorization': f"Bearer {s['token']}"}, timeout=30)
        assert r.status_code == 200, r.text
        with s['engine'].connect() as c:
            assert c.execute(sa.text("select status from runs where kind = 'serve'")).scalars().all() == ['running']   # the worker that scored
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= (2 if workers > 1 else 0)
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully (with its worker processes), then may end itself by the signal it caught (the shell sees 143)
        assert proc.wait(30) in (0, -signal.SIGTERM), proc.stdout.read().decode()[-2000:]
        assert not psutil.wait_procs(children, timeout=10)[1]   # no worker left behind
    assert port_free(s['port'])
    with s['engine'].connect() as c:   # the graceful shutdown closed the service's run-ledger entry
        assert c.execute(sa.text("select status from runs where kind = 'serve'")).scalars().all() == ['succeeded']


async def _offer(url: str, token: str, patients: list[str], rate: float, seconds: float) -> list[tuple[int, str | None, dict | None, str]]:
    "Offer `rate` requests/s for `seconds` (open loop: a request is sent on time whether or not earlier ones finished)."
    import httpx
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    async with httpx.AsyncClient(limits=limits, timeout=30, headers={'Authorization': f'Bearer {token}'}) as c:
        async def one(i):
            rid = f'load-{i}'
            try: r = await c.post(url, json={'patient_key': patients[i % len(patients)], 'request_id': rid})
            except httpx.TransportError as e: return (0, None, None, rid)
            return (r.status_code, r.headers.get('retry-after'), r.json() if r.status_code == 200 else None, rid)
        t0, tasks = time.monotonic(), []
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one(i)))
        return await asyncio.gather(*tasks)


@pytest.mark.slow
def test_ten_times_the_target_load_gets_503_with_retry_after_and_one_packet_per_accepted(service_store):
    s = service_store
    with cde_serve(s['store'].env, s['port'], '--max-in-flight', '4'):
        t0 = time.monotonic()
        got = asyncio.run(_offer(f"http://127.0.0.1:{s['port']}/v1/deployments/{SMALL_DEPLOYMENT}/score", s['token'], s['patients'],
                                 rate=500, seconds=2))
        took = time.monotonic() - t0
    statuses = [g[0] for g in got]
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    accepted = [g for g in got if g[0] == 200]
    busy = [g for g in got if g[0] == 503]
    assert accepted and busy, (len(accepted), len(busy))
    assert all(g[1] == '1' for g in busy)
    assert all(g[2]['created'] and g[2]['request_id'] == g[3] for g in accepted)
    assert packets(s['engine'], trigger='api') == len(accepted) == len({g[2]['packet_id'] for g in accepted})
    with s['engine'].connect() as c:
        stored = {r[0] for r in c.execute(sa.text("select request_id from inferences where trigger = 'api'"))}
    assert stored == {g[3] for g in accepted}
    assert took < 60


def copy_store(src_url: str, dest_url: str) -> None:
    "Copy every table of a store into a freshly migrated one (rows as they are), then move the id sequences past them."
    from cde_workbench.store import get_engine, metadata
    src, dest = sa.create_engine(src_url), get_engine(dest_url)
    with src.connect() as a, dest.begin() as b:
        for t in metadata.sorted_tables:
            rows = [dict(r._mapping) for r in a.execute(sa.select(t))]
            b.execute(t.delete())
            for i in range(0, len(rows), 5000):
                if rows[i:i + 5000]: b.execute(t.insert(), rows[i:i + 5000])
            for col in t.primary_key.columns:
                if col.autoincrement is True or (col.autoincrement == 'auto' and isinstance(col.type, sa.Integer) and len(t.primary_key.columns) == 1):
                    b.execute(sa.text(f"select setval(pg_get_serial_sequence('{t.name}', '{col.name}'), coalesce(max({col.name}), 0) + 1, false) from {t.name}"))
    src.dispose()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get('CDE_SKIP_POSTGRES') == '1', reason='CDE_SKIP_POSTGRES=1')
def test_the_store_going_away_gives_503_and_the_service_recovers_when_it_returns(service_store):
    "A throwaway PostgreSQL holding a copy of the store is stopped under the running service, then started again."
    from pgserver import PgServer, postgres_available
    from cde_workbench.store import dispose_engines
    import httpx
    if not postgres_available(): pytest.fail('PostgreSQL server binaries are not installed: run `make test`, which installs them')
    s = service_store
    dispose_engines()
    server = PgServer('cde_service')
    url = server.start()
    try:
        copy_store(s['store'].url, url)
        dispose_engines()
        env = {**s['store'].env, 'CDE_DATABASE_URL': url}
        api = f"http://127.0.0.1:{s['port']}/v1/deployments/{SMALL_DEPLOYMENT}/score"
        auth = {'Authorization': f"Bearer {s['token']}"}
        post = lambda i: httpx.post(api, json={'patient_key': s['patients'][i % 40], 'request_id': f'pg-{i}'}, headers=auth, timeout=30)
        pg_ctl = [str(server.bindir / 'pg_ctl'), '-D', str(server.datadir), '-w', '-t', '30']
        with cde_serve(env, s['port']):
            assert post(0).status_code == 200
            server._run([*pg_ctl, '-m', 'fast', 'stop'], 'pg_ctl stop')
            for i in (1, 2, 3):
                r = post(i)
                assert r.status_code == 503 and r.headers['retry-after'] == '1', r.text
                assert r.json()['error'] == 'the store is unavailable; retry later'
            server._run([*pg_ctl, '-l', str(server.logfile), 'start'], 'pg_ctl start')
            deadline, codes = time.monotonic() + 30, []
            while time.monotonic() < deadline:
                codes.append(post(10 + len(codes)).status_code)
                if codes[-1] == 200: break
                time.sleep(0.5)
            assert codes[-1] == 200 and set(codes) <= {200, 503}, codes
            assert post(0).json()['created'] is False   # the packet stored before the outage is still the answer
        e = sa.create_engine(url)
        with e.connect() as c:
            n = c.execute(sa.text("select count(*) from inferences where trigger = 'api'")).scalar()
        e.dispose()
        assert n == 2
    finally:
        dispose_engines()
        server.stop()


@pytest.mark.slow
def test_the_service_benchmark_runs_short(service_store):
    "benchmarks/service.py's measurement (load process, JWT per call, packets = accepted) for a few seconds on the small store."
    import sys
    sys.path.insert(0, str(ROOT / 'benchmarks'))
    from service import configure, measure
    s = service_store
    env = {**s['store'].env, 'CDE_DATABASE_URL': s['store'].url}
    pem = configure(env, s['store'].base)
    got = measure(env, 'sklearn', rate=10, seconds=3, pem=pem, patients=s['patients'], label='sm')
    assert got['calls'] == 30 and got['errors'] == 0 and got['packets'] == got['accepted'] == 30, got
    assert 0 < got['p50'] <= got['p99'] < 5000
