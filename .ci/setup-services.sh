#!/usr/bin/env bash
# Installs the system packages the tests need (idempotent). Services are started by test fixtures.
set -euo pipefail
need=()
command -v make >/dev/null || need+=(make)
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
