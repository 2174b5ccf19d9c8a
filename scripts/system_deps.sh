#!/usr/bin/env bash
# Debian packages the tests use: Chromium for the browser tests, PostgreSQL for the store tests.
# Installed only when missing and only when we are root (CI and dev machines here run as root).
set -euo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "[system] apt-get install ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "[system] missing ${need[*]}; install them with apt-get (browser/postgres tests will fail)" >&2
  fi
fi
