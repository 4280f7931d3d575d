#!/usr/bin/env bash
# make docker-test: the images and the compose stack on a local dockerd, with no registry in reach.
#  1. docker.io and debootstrap from Debian's apt when missing (root);
#  2. a dockerd of its own (data under $CDE_DOCKER_TEST_DIR, a unix socket there; stopped on exit, whatever happens);
#  3. a base image from `debootstrap bookworm` (python3, venv, PostgreSQL 15) imported with `docker import` (kept between runs);
#  4. `cde stack up --build --base` that image (images built offline from wheelhouse/), PostgreSQL from the same base;
#  5. a deployment that scores, made with the workbench's own CLI inside the containers: a small synthetic hospital
#     (`cde synth --patients 200`) loaded into the stack's PostgreSQL (`cde ingest warehouse`), `cde train hgb_abnormal`,
#     `cde deploy hgb_abnormal silent` (silent: the service scores and keeps a packet, a clinician sees nothing);
#  6. a scoring request for a patient in the stack's store (a token added in the container): a score in [0, 1], its
#     packet in PostgreSQL; the dashboards' login page, JupyterLab with its token;
#  7. `cde stack down --volumes`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
T0=$(date +%s)
DIR=${CDE_DOCKER_TEST_DIR:-/var/tmp/cde-docker-test}
BASE=cde-local/debian-python:bookworm
PGIMAGE=cde-local/postgres:15
CDE=$ROOT/.venv/bin/cde
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}   # this checkout's package, whatever the venv has installed
say() { echo "docker-test: $*"; }

if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  say "installing docker.io and debootstrap (apt)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null
fi
mkdir -p "$DIR"
SOCK=$DIR/docker.sock
export DOCKER_HOST=unix://$SOCK
# its own workspace (var/stack.env with the stack's secrets) and host ports other than the defaults
export CDE_VAR=$DIR/var CDE_REPORTS=$DIR/reports
export CDE_SCORING_PORT=${CDE_SCORING_PORT:-18700} CDE_DASHBOARD_PORT=${CDE_DASHBOARD_PORT:-18866} CDE_LAB_PORT=${CDE_LAB_PORT:-18888}
export CDE_POSTGRES_IMAGE=$PGIMAGE CDE_IMAGE_TAG=docker-test

DOCKERD_PID=
cleanup() {
  rc=$?
  if [[ -n "$DOCKERD_PID" ]] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
    if (( rc != 0 )); then
      for s in postgres scoring scheduler dashboards research; do
        echo "--- $s (last lines)"; "$CDE" stack logs "$s" --tail 15 2>&1 || true
      done
    fi
    "$CDE" stack down --volumes >/dev/null 2>&1 || true
    kill "$DOCKERD_PID" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$DOCKERD_PID" 2>/dev/null || true
  fi
  say "$([[ $rc == 0 ]] && echo passed || echo FAILED) in $(( $(date +%s) - T0 )) s"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "starting dockerd (data $DIR/data, socket $SOCK)"
dockerd --data-root "$DIR/data" --exec-root "$DIR/exec" --pidfile "$DIR/dockerd.pid" --host "$DOCKER_HOST" \
        --iptables=false --ip6tables=false --bridge=none >"$DIR/dockerd.log" 2>&1 &
DOCKERD_PID=$!
for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
docker info >/dev/null 2>&1 || { say "dockerd did not start:"; tail -5 "$DIR/dockerd.log"; exit 1; }

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  if [[ ! -x "$DIR/rootfs/usr/bin/python3" ]]; then
    mirror=$(grep -h -m1 -o 'http[s]*://[^ ]*debian/*$' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -1 || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    say "debootstrap bookworm from $mirror"
    rm -rf "$DIR/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,postgresql bookworm "$DIR/rootfs" "$mirror" >"$DIR/debootstrap.log"
  fi
  say "importing the base image $BASE"
  tar -C "$DIR/rootfs" -c . | docker import --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
fi
say "building $PGIMAGE"
docker build -q --network none -f docker/local/Dockerfile.postgres --build-arg BASE="$BASE" -t "$PGIMAGE" . >/dev/null

say "cde stack up --build --base $BASE"
t=$(date +%s)
"$CDE" stack up --build --base "$BASE" --timeout 240
say "stack up in $(( $(date +%s) - t )) s"
"$CDE" stack status

# a deployment to score with, through the CLI inside the scoring container (its var/ volume is shared with the
# scheduler and the dashboards; the store is the stack's PostgreSQL)
in_stack() { docker exec cde-scoring-1 cde "$@"; }
psql_stack() { docker exec cde-postgres-1 psql -U cde -d cde -v ON_ERROR_STOP=1 -tAc "$1"; }
t=$(date +%s)
say "cde synth --patients 200 (in cde-scoring-1)"
in_stack synth --patients 200 --out /var/lib/cde/var/synth
say "cde ingest warehouse"
in_stack ingest warehouse /var/lib/cde/var/synth/warehouse
say "cde train hgb_abnormal"
in_stack train hgb_abnormal
in_stack deploy hgb_abnormal silent --reason "make docker-test"
say "a silent deployment in $(( $(date +%s) - t )) s"
PATIENT=$(psql_stack "select patient_key from patients order by patient_key limit 1")
[[ -n "$PATIENT" ]] || { say "no patient in the stack's store"; exit 1; }

# a scoring request: an API token added inside the container, the service restarted to read it
TOKEN=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')
echo "$TOKEN" | docker exec -i cde-scoring-1 cde serve tokens add docker-test --from-stdin
docker restart cde-scoring-1 >/dev/null
JUPYTER_TOKEN=$(sed -n 's/^JUPYTER_TOKEN=//p' "$CDE_VAR/stack.env")
"$ROOT/.venv/bin/python" - "$TOKEN" "$JUPYTER_TOKEN" "$PATIENT" "$DIR/packet.json" <<'PY'
import json, os, sys, time, httpx
token, lab_token, patient, packet_file = sys.argv[1:5]
S, D, L = (f"http://127.0.0.1:{os.environ[k]}" for k in ('CDE_SCORING_PORT', 'CDE_DASHBOARD_PORT', 'CDE_LAB_PORT'))
for _ in range(120):   # the scoring service after its restart
    try:
        if httpx.get(f'{S}/healthz', timeout=2).status_code == 200: break
    except httpx.HTTPError: pass
    time.sleep(1)
url, body = f'{S}/v1/deployments/hgb_abnormal/score', {'patient_key': patient, 'request_id': 'docker-test-1'}
r = httpx.post(url, json=body, timeout=30)
assert r.status_code == 401, (r.status_code, r.text)   # no token: refused
r = httpx.post(url, json=body, headers={'Authorization': f'Bearer {token}'}, timeout=60)
print(f'docker-test: scoring request for {patient} -> {r.status_code} {r.text[:400]}')
assert r.status_code == 200 and r.headers['content-type'].startswith('application/json'), (r.status_code, r.text)
a = r.json()
assert a['patient_key'] == patient and a['deployment'] == 'hgb_abnormal', a
assert isinstance(a['score'], float) and 0 <= a['score'] <= 1, a['score']
assert a['output_mode'] == 'silent' and a['shown'] is False, a   # silent: scored and kept, shown to no one
r2 = httpx.post(url, json=body, headers={'Authorization': f'Bearer {token}'}, timeout=60)   # a retry: the same packet
assert r2.status_code == 200 and r2.json()['packet_id'] == a['packet_id'] and r2.json()['score'] == a['score'], r2.text
open(packet_file, 'w').write(json.dumps(a))
r = httpx.get(f'{D}/login', timeout=30)
assert r.status_code == 200 and 'password' in r.text.lower(), (r.status_code, r.text[:300])
print(f'docker-test: dashboards login page -> {r.status_code}')
r = httpx.get(f'{D}/voila/render/monitor.ipynb', timeout=30, follow_redirects=False)
assert r.status_code in (302, 403), r.status_code   # no reader's token: sent to the login page
r = httpx.get(f'{L}/lab', params={'token': lab_token}, timeout=30, follow_redirects=True)
assert r.status_code == 200 and 'JupyterLab' in r.text, (r.status_code, r.text[:300])
print(f'docker-test: JupyterLab with its token -> {r.status_code}')
r = httpx.get(f'{L}/lab', timeout=30, follow_redirects=True)
assert r.status_code == 200 and '/login' in str(r.url), (r.status_code, r.url)
print('docker-test: JupyterLab without a token -> login page')
PY
# the packet in the stack's PostgreSQL, as the service answered it
read -r PACKET SCORE < <(python3 -c 'import json, sys; a = json.load(open(sys.argv[1])); print(a["packet_id"], repr(a["score"]))' "$DIR/packet.json")
ROW=$(psql_stack "select deployment, patient_key, trigger, output_mode, score from inferences where inference_id = $PACKET")
say "packet $PACKET in the store: $ROW"
python3 - "$ROW" "$PATIENT" "$SCORE" <<'PY'
import sys
row, patient, score = sys.argv[1:4]
dep, pk, trig, mode, s = row.split('|')
assert (dep, pk, trig, mode) == ('hgb_abnormal', patient, 'api', 'silent'), row
assert abs(float(s) - float(score)) < 1e-12, (s, score)
PY
say "cde stack down --volumes"
"$CDE" stack down --volumes
