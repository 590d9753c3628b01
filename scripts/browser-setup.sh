#!/usr/bin/env bash
# Install Debian's chromium and chromium-driver for the dashboard's browser tests
# (crates/potluck-testkit/tests/it/web.rs), if they are missing. Idempotent; prints the
# versions installed. Debian pins the two to the same version; we pin nothing more.
set -euo pipefail
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
# `chromium --version` runs a wrapper script that may print shell noise on stderr.
echo "    $(chromium --version 2>/dev/null); $(chromedriver --version 2>/dev/null | cut -d' ' -f1-2)"
