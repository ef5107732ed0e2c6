#!/usr/bin/env bash
# Set up neuronode on a fresh Debian machine: system tools (as root), a venv, torch CPU, the package.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v /usr/sbin/Orthanc >/dev/null 2>&1 || need_apt+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need_apt+=(orthanc-dicomweb)
[ -x /usr/bin/storescu ] || need_apt+=(dcmtk)
[ -x /usr/bin/dciodvfy ] || need_apt+=(dicom3tools)
[ -x /usr/bin/systemd-analyze ] || need_apt+=(systemd)
[ -x /usr/bin/shellcheck ] || need_apt+=(shellcheck)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
[ -x /usr/bin/chromedriver ] || need_apt+=(chromium-driver)
[ -d /usr/lib/postgresql ] || need_apt+=(postgresql)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: apt-get install ${need_apt[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "setup: missing system packages (${need_apt[*]}); tests needing them will be skipped" >&2
  fi
fi

# docker-compose only validates deploy/compose.yaml here: without its recommends (docker.io,
# a daemon this machine does not need).
if [ ! -x /usr/bin/docker-compose ] && [ "$(id -u)" = 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null; }
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first, pinned to the CPU build: never let pip resolve a plain 'torch' (CUDA, gigabytes).
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[lab,test]' 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, monai, pydicom, pynetdicom, highdicom, node" \
  || { echo "setup: the install is incomplete" >&2; exit 1; }
echo "setup: ready (.venv)" >&2
