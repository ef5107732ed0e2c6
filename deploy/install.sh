#!/usr/bin/env bash
# Install neuronode on a Debian host from this repository as the hardened systemd service
# deploy/neuronode.service. Run as root from a checkout:   sudo bash deploy/install.sh
#
#   --dry-run      print every step (commands prefixed with '+'), change nothing
#   --prefix DIR   install under DIR instead of / (a staging root: the rule file and the unit
#                  still name /opt, /etc and /var/lib; user, ownership and systemctl are skipped)
#   --print-rules  print the rule file this script would install, then exit
#
# Idempotent: the user, the venv and torch are made only when missing; the package, the models
# and the unit are brought up to date; an existing /etc/neuronode/rules.yaml is never
# overwritten (the new default goes beside it as rules.yaml.dist).
# NOT FOR CLINICAL USE: the shipped models are trained on synthetic phantoms.
set -euo pipefail

readonly TORCH_PIN="torch==2.13.0"
readonly TORCH_INDEX="https://download.pytorch.org/whl/cpu"
readonly SERVICE_USER="neuronode"
readonly APP_DIR="/opt/neuronode"
readonly VENV_DIR="$APP_DIR/venv"
readonly MODELS_DIR="$APP_DIR/models"
readonly CONFIG_DIR="/etc/neuronode"
readonly STATE_DIR="/var/lib/neuronode"
readonly SPOOL_DIR="$STATE_DIR/spool"
readonly UNIT_PATH="/etc/systemd/system/neuronode.service"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO
PYTHON="${PYTHON:-python3}"
DRY_RUN=0
PREFIX=""
PRINT_RULES=0

usage() {
  sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --prefix)
      [ $# -ge 2 ] || { echo "install: --prefix needs a folder" >&2; exit 2; }
      PREFIX="${2%/}"
      shift
      ;;
    --print-rules) PRINT_RULES=1 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "install: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

say() { echo "install: $*" >&2; }

# Run a command, or only show it under --dry-run.
run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# The shipped rule file with the two paths that differ on an installed host: the bundles in
# /opt/neuronode/models and the spool that the unit's ReadWritePaths= names.
render_rules() {
  sed -e "s#^models_dir:[[:space:]]*[^[:space:]]*#models_dir: $MODELS_DIR#" \
    -e "s#^\([[:space:]]*spool_dir:[[:space:]]*\)[^[:space:]]*#\1$SPOOL_DIR#" \
    "$REPO/routing_rules/default.yaml"
}

if [ "$PRINT_RULES" = 1 ]; then
  render_rules
  exit 0
fi

# Steps that act on the host itself (users, ownership, systemd) only when installing into /.
ON_HOST=1
[ -n "$PREFIX" ] && ON_HOST=0

if [ "$DRY_RUN" = 0 ] && [ "$ON_HOST" = 1 ] && [ "$(id -u)" != 0 ]; then
  say "run as root (or try --dry-run, or --prefix DIR to stage the files)"
  exit 1
fi

# requires-python is >=3.11,<3.12 (pyproject.toml); Debian 12's python3 is 3.11.
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
  say "needs Python 3.11 ($PYTHON is not): apt-get install python3 python3-venv on Debian 12,"
  say "or set PYTHON=/path/to/python3.11"
  [ "$DRY_RUN" = 1 ] || exit 1
fi

say "from $REPO into ${PREFIX:-/}$([ "$DRY_RUN" = 1 ] && echo ' (dry run: nothing is changed)')"

# 1. The service user: a system account with no login and no home of its own to write.
if [ "$ON_HOST" = 0 ]; then
  say "user $SERVICE_USER: skipped under --prefix"
elif id -u "$SERVICE_USER" >/dev/null 2>&1; then
  say "user $SERVICE_USER: exists"
else
  run useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
    --shell /usr/sbin/nologin --comment "neuronode DICOM node" "$SERVICE_USER"
fi

# 2. The venv, CPU torch first (a plain 'pip install torch' would pull CUDA, gigabytes), then
#    the package without the [lab] extra.
venv="$PREFIX$VENV_DIR"
if [ -x "$venv/bin/python" ]; then
  say "venv $VENV_DIR: exists"
else
  run install -d -m 0755 "$PREFIX$APP_DIR"
  run "$PYTHON" -m venv "$venv"
fi
if [ -x "$venv/bin/python" ] &&
  "$venv/bin/python" -c 'import sys, torch; sys.exit(not torch.__version__.startswith("2.13.0"))' \
    2>/dev/null; then
  say "torch: $TORCH_PIN present"
else
  run "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    --index-url "$TORCH_INDEX" "$TORCH_PIN"
fi
run "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$REPO"

# 3. The model bundles, replaced as a whole so a removed bundle does not linger.
run install -d -m 0755 "$PREFIX$APP_DIR"
run rm -rf "$PREFIX$MODELS_DIR.new"
run cp -R "$REPO/models" "$PREFIX$MODELS_DIR.new"
run rm -rf "$PREFIX$MODELS_DIR"
run mv "$PREFIX$MODELS_DIR.new" "$PREFIX$MODELS_DIR"

# 4. The rule file: written once; later runs leave the site's edits alone.
rules="$PREFIX$CONFIG_DIR/rules.yaml"
run install -d -m 0755 "$PREFIX$CONFIG_DIR"
if [ -e "$rules" ]; then
  say "rules $CONFIG_DIR/rules.yaml: exists, kept; the shipped default goes to rules.yaml.dist"
  target="$rules.dist"
else
  target="$rules"
fi
if [ "$DRY_RUN" = 1 ]; then
  printf '+ render_rules > %q\n' "$target"
else
  render_rules >"$target"
fi
run chmod 0644 "$target"

# 5. The spool: the one folder the service may write.
if [ "$ON_HOST" = 1 ]; then
  run install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE_DIR" "$SPOOL_DIR"
else
  run install -d -m 0750 "$PREFIX$STATE_DIR" "$PREFIX$SPOOL_DIR"
fi

# 6. The unit, enabled (started at boot). Not started here: set node.bind_address,
#    allowed_callers and destinations first.
run install -d -m 0755 "$(dirname "$PREFIX$UNIT_PATH")"
run install -m 0644 "$REPO/deploy/neuronode.service" "$PREFIX$UNIT_PATH"
if [ "$ON_HOST" = 1 ]; then
  run systemctl daemon-reload
  run systemctl enable neuronode.service
else
  say "systemctl: skipped under --prefix"
fi

say "done. Next: edit $CONFIG_DIR/rules.yaml (node.bind_address, allowed_callers, destinations),"
say "  $VENV_DIR/bin/neuronode check $CONFIG_DIR/rules.yaml && systemctl start neuronode"
say "  journalctl -u neuronode -f"
