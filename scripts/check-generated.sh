#!/usr/bin/env bash
# Fail when nbdev_export or nbdev_clean would change the tree (tracked or untracked files):
# cde_workbench/ must be what the notebooks export, and every notebook must already be clean.
set -euo pipefail
cd "$(dirname "$0")/.."
paths=(cde_workbench nbs deployments dashboards research)
snapshot() { find "${paths[@]}" -type f -not -path '*/__pycache__/*' -not -path '*/.ipynb_checkpoints/*' -print0 | sort -z | xargs -0 sha256sum; }
before=$(snapshot)
.venv/bin/nbdev_export
.venv/bin/nbdev_clean
.venv/bin/nbdev_clean --fname deployments
.venv/bin/nbdev_clean --fname dashboards
.venv/bin/nbdev_clean --fname research
after=$(snapshot)
if [[ "$before" != "$after" ]]; then
  echo "nbdev_export or nbdev_clean changed these files; run them and commit the result:" >&2
  diff <(echo "$before") <(echo "$after") | grep '^[<>]' | awk '{print "  " $3}' | sort -u >&2
  exit 1
fi
echo "generated code and notebooks are in step"
