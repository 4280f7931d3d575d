#!/usr/bin/env bash
# Install the Debian packages the tests need, only when they are missing:
# PostgreSQL server binaries (the store tests run on a throwaway server) and Chromium (browser tests).
set -euo pipefail
need=()
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || command -v initdb >/dev/null || need+=(postgresql)
[[ -x /usr/bin/chromium ]] || need+=(chromium)
if (( ${#need[@]} )); then
  echo "installing Debian packages: ${need[*]}"
  sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
