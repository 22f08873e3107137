#!/usr/bin/env bash
# Installs Checkov (the manifest scanner of tests/unit/test_checkov.py) into its own virtual
# environment: it pins many packages that would conflict with kubetune's. Idempotent: does
# nothing when the pinned version is there already.
set -euo pipefail
CHECKOV_VERSION=3.3.30
venv="${KUBETUNE_CHECKOV_VENV:-${HOME}/.cache/kubetune/checkov-venv}"
if [ -x "$venv/bin/checkov" ] && [ "$(cat "$venv/.installed" 2>/dev/null)" = "$CHECKOV_VERSION" ]; then
  echo "checkov $CHECKOV_VERSION installed already in $venv"
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "checkov==$CHECKOV_VERSION"
echo "$CHECKOV_VERSION" >"$venv/.installed"
echo "checkov $CHECKOV_VERSION installed in $venv"
