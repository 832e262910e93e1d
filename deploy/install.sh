#!/bin/sh
# Install, upgrade or remove mlbench-daemon as a systemd service.  Run as root.
#
#   install.sh [--wheelhouse DIR] [--python PATH]   install, or upgrade what is installed
#   install.sh --uninstall                          remove program and unit; keep config and state
#
# Install and upgrade are the same run, and running it again changes nothing:
#   - a venv under /opt/mlbench-daemon, made by the distribution's Python
#     (/usr/bin/python3, or the newest /usr/bin/python3.1x when that one is older
#     than 3.11; --python to choose), never one under a home directory: the unit's
#     ProtectHome=yes hides those.  A new release gets a new venv and
#     /opt/mlbench-daemon/current switches to it; the previous one is kept.
#   - the package from the wheelhouse DIR with no index (--wheelhouse; the default
#     when this script sits in a wheelhouse), else from the source tree around it
#     through pip's index;
#   - the system user mlbench-daemon; /etc/mlbench-daemon with the example config
#     (an existing config is never touched); the unit, daemon-reload, enable;
#   - /usr/local/bin/mlbench-daemon for the CLI;
#   - it starts the service once the SSH key and an edited, valid config are in
#     place, and otherwise says what is missing; a running service is restarted
#     (try-restart) when the program or the unit changed.  Running jobs survive
#     a restart: the daemon re-attaches to them.
set -eu
umask 022

NAME=mlbench-daemon
PREFIX=/opt/$NAME
ETC=/etc/$NAME
CONF=$ETC/$NAME.toml
KEY=$ETC/ssh_key
STATE=/var/lib/$NAME
UNIT_DIR=/etc/systemd/system
UNIT=$UNIT_DIR/$NAME.service
LINK=/usr/local/bin/$NAME
HERE=$(cd "$(dirname "$0")" && pwd)

say() { printf '%s\n' "$*"; }
die() { printf '%s: %s\n' "$NAME install" "$*" >&2; exit 1; }
changed=0
did() { say "  $*"; changed=1; }

usage() {
    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

wheelhouse=
python=
uninstall=0
while [ $# -gt 0 ]; do
    case $1 in
        --wheelhouse) [ $# -ge 2 ] || usage; wheelhouse=$2; shift 2 ;;
        --wheelhouse=*) wheelhouse=${1#*=}; shift ;;
        --python) [ $# -ge 2 ] || usage; python=$2; shift 2 ;;
        --python=*) python=${1#*=}; shift ;;
        --uninstall) uninstall=1; shift ;;
        -h|--help) usage ;;
        *) say "unknown argument: $1" >&2; usage ;;
    esac
done

[ "$(id -u)" -eq 0 ] || die "run as root (it creates a user, /opt/$NAME and a systemd unit)"
command -v systemctl >/dev/null || die "systemctl not found: this installs a systemd service"

# --- uninstall ----------------------------------------------------------------------------

if [ "$uninstall" = 1 ]; then
    if [ -e "$UNIT" ]; then
        # Stopping leaves running jobs running on the cluster (KillMode=mixed; the
        # daemon only stops following them); a later install re-attaches them.
        systemctl disable --now -q "$NAME" 2>/dev/null || true
        rm -f "$UNIT"
        systemctl daemon-reload
        say "  stopped and removed $UNIT"
    fi
    if [ -L "$LINK" ] && case $(readlink "$LINK") in "$PREFIX"/*) true ;; *) false ;; esac; then
        rm -f "$LINK"
        say "  removed $LINK"
    fi
    if [ -d "$PREFIX" ]; then
        rm -rf "$PREFIX"
        say "  removed $PREFIX"
    fi
    say "$NAME removed.  Kept: $ETC (config, key), $STATE (job records and logs)" \
        "and the user $NAME; remove them by hand if you want them gone."
    exit 0
fi

# --- what to install from -----------------------------------------------------------------

if [ -z "$wheelhouse" ] && ls "$HERE"/*.whl >/dev/null 2>&1; then
    wheelhouse=$HERE
fi
if [ -n "$wheelhouse" ]; then
    [ -d "$wheelhouse" ] || die "--wheelhouse $wheelhouse: not a directory"
    wheelhouse=$(cd "$wheelhouse" && pwd)
    ls "$wheelhouse"/mlbench_daemon-*.whl >/dev/null 2>&1 ||
        die "--wheelhouse $wheelhouse: no $NAME wheel in it (make wheelhouse builds one)"
    src=
else
    src=$(cd "$HERE/.." && pwd)
    [ -f "$src/pyproject.toml" ] && [ -d "$src/mlbench_daemon" ] ||
        die "no wheelhouse given and no source tree at $src: use --wheelhouse DIR"
fi
# The unit and the example config: beside this script (a wheelhouse), else in the tree.
find_file() {
    for f in "$HERE/$1" "$HERE/../$2/$1"; do
        [ -f "$f" ] && { printf '%s\n' "$f"; return; }
    done
    die "$1 not found next to $0"
}
unit_src=$(find_file "$NAME.service" systemd)
conf_src=$(find_file "$NAME.toml" config)

# --- the Python ---------------------------------------------------------------------------

py_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }
if [ -z "$python" ]; then
    for p in /usr/bin/python3 /usr/bin/python3.13 /usr/bin/python3.12 /usr/bin/python3.11; do
        if [ -x "$p" ] && py_ok "$p"; then python=$p; break; fi
    done
    [ -n "$python" ] || die "no Python 3.11 or newer in /usr/bin: install one" \
        "(Debian 12 / Ubuntu 24.04: apt install python3 python3-venv;" \
        "RHEL/Rocky 9: dnf install python3.11) or name it with --python"
fi
[ -x "$python" ] || die "--python $python: not an executable"
py_ok "$python" || die "$python is older than 3.11; $NAME needs 3.11 or newer"
case $(realpath "$python") in
    /home/*|/root/*|/run/user/*)
        die "$python lives under a home directory, which the unit hides (ProtectHome=yes):" \
            "use the distribution's Python, e.g. /usr/bin/python3" ;;
esac
pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ -n "$wheelhouse" ] && [ -f "$wheelhouse/PYTHON" ]; then
    built=$(cat "$wheelhouse/PYTHON")
    [ "$built" = "$pyver" ] || die "the wheelhouse was built for Python $built, but $python" \
        "is $pyver: build it again with 'make wheelhouse PYTHON=python$pyver'"
fi

# What this run would install; the same value as the current venv means nothing to do.
if [ -n "$wheelhouse" ]; then
    what=$(cd "$wheelhouse" && sha256sum ./*.whl)
else
    what=$(cd "$src" && find pyproject.toml setup.py mlbench_daemon -type f \
        ! -name '*.pyc' ! -path '*/__pycache__/*' | LC_ALL=C sort | xargs sha256sum)
fi
fingerprint=$(printf '%s\n%s\n%s\n' "$(realpath "$python")" "$("$python" -VV)" "$what" |
    sha256sum | cut -d' ' -f1)

say "Installing $NAME with $python ($pyver)${wheelhouse:+ from the wheelhouse $wheelhouse}"

# --- the venv -----------------------------------------------------------------------------

venv_changed=0
current=$PREFIX/current
if [ -f "$current/.fingerprint" ] && [ "$(cat "$current/.fingerprint")" = "$fingerprint" ] &&
    "$current/bin/$NAME" --version >/dev/null 2>&1; then
    :
else
    mkdir -p "$PREFIX"
    new=$PREFIX/venv-$(date -u +%Y%m%d%H%M%S)-$$
    trap 'rm -rf "$new"' EXIT
    if ! "$python" -m venv "$new" >/dev/null 2>&1; then
        # No ensurepip (Debian's python3-venv not installed): a venv without pip,
        # and pip from the wheelhouse, run straight from its wheel.
        rm -rf "$new"
        pipwheel=
        [ -n "$wheelhouse" ] && pipwheel=$(ls "$wheelhouse"/pip-*.whl 2>/dev/null | tail -n1)
        [ -n "$pipwheel" ] || die "$python -m venv failed (is python3-venv installed?)" \
            "and there is no pip wheel to fall back to: install python3-venv, or use" \
            "--wheelhouse DIR from 'make wheelhouse'"
        "$python" -m venv --without-pip "$new"
        "$new/bin/python" "$pipwheel/pip" install -q --no-index --find-links "$wheelhouse" pip ||
            die "could not install pip into $new from $pipwheel"
        say "  (no ensurepip for $python: pip came from the wheelhouse)"
    fi
    if [ -n "$wheelhouse" ]; then
        "$new/bin/python" -m pip install -q --disable-pip-version-check --no-index \
            --find-links "$wheelhouse" "$NAME" || die "pip could not install from $wheelhouse"
    else
        # from a clean copy: pip builds in the tree it is given, and a build/ left
        # there by an older release could ship files that no longer exist
        copy=$(mktemp -d)
        cp -R "$src/pyproject.toml" "$src/setup.py" "$src/README.md" "$src/mlbench_daemon" "$copy/"
        find "$copy" -name __pycache__ -prune -exec rm -rf {} +
        "$new/bin/python" -m pip install -q --disable-pip-version-check "$copy" ||
            { rm -rf "$copy"; die "pip could not install $src"; }
        rm -rf "$copy"
    fi
    version=$("$new/bin/$NAME" --version) || die "the new venv does not run: $new"
    printf '%s\n' "$fingerprint" >"$new/.fingerprint"
    ln -sfn "$(basename "$new")" "$PREFIX/current.new"
    mv -T "$PREFIX/current.new" "$current"
    trap - EXIT
    venv_changed=1
    did "$version in $new (now $current)"
    # keep the venv just switched from (a running daemon may still read it); drop older ones
    for old in $(ls -1dt "$PREFIX"/venv-* | tail -n +3); do rm -rf "$old"; done
fi

# --- user, config, unit, link -------------------------------------------------------------

if ! getent passwd "$NAME" >/dev/null; then
    nologin=$(command -v nologin || echo /usr/sbin/nologin)
    useradd --system --user-group --home-dir "$STATE" --no-create-home \
        --shell "$nologin" --comment "$NAME" "$NAME"
    did "created the system user $NAME"
fi

if [ ! -d "$ETC" ]; then
    install -d -m 0755 "$ETC"
    did "created $ETC"
fi
if [ ! -e "$CONF" ]; then
    install -m 0640 -g "$NAME" "$conf_src" "$CONF"
    did "installed the example config as $CONF"
fi
if ! cmp -s "$conf_src" "$CONF.example"; then
    install -m 0644 "$conf_src" "$CONF.example"
    did "updated $CONF.example (the commented example with every key)"
fi

unit_changed=0
if ! cmp -s "$unit_src" "$UNIT"; then
    install -m 0644 "$unit_src" "$UNIT"
    systemctl daemon-reload
    unit_changed=1
    did "installed $UNIT (systemctl daemon-reload)"
fi
if ! systemctl is-enabled -q "$NAME" 2>/dev/null; then
    systemctl enable -q "$NAME"
    did "enabled $NAME (starts at boot)"
fi

if [ "$(readlink "$LINK" 2>/dev/null)" != "$current/bin/$NAME" ]; then
    if [ -e "$LINK" ] && [ ! -L "$LINK" ]; then
        say "  note: $LINK exists and is not a link (an old 'pip install'?); left alone"
    else
        mkdir -p "$(dirname "$LINK")"
        ln -sfn "$current/bin/$NAME" "$LINK"
        did "linked $LINK"
    fi
fi

# --- start, restart, or say what is missing -----------------------------------------------

missing=
[ -e "$KEY" ] || missing="$missing
  - the cluster user's SSH private key: install -m 0600 KEY_FILE $KEY"
if cmp -s "$conf_src" "$CONF"; then
    missing="$missing
  - your settings in $CONF (it is the unedited example): at least
    discovery.service, discovery.nameservers, ssh.user and mpi.program"
elif ! err=$(CREDENTIALS_DIRECTORY=$ETC "$current/bin/python" -c '
import sys
from mlbench_daemon import config
try:
    config.load(sys.argv[1])
except config.ConfigError as e:
    sys.exit(str(e))' "$CONF" 2>&1); then
    missing="$missing
  - a valid $CONF: $err"
fi

if command -v runuser >/dev/null && ! runuser -u "$NAME" -- test -r "$CONF"; then
    missing="$missing
  - $CONF readable by the user $NAME: chgrp $NAME $CONF && chmod 0640 $CONF"
fi

if [ -n "$missing" ]; then
    say "$NAME is installed and enabled but not started; it needs:$missing"
    say "Then run this again, or: systemctl start $NAME"
    exit 0
fi

if systemctl is-active -q "$NAME"; then
    if [ "$venv_changed" = 1 ] || [ "$unit_changed" = 1 ]; then
        # running jobs survive: the daemon stops following them and re-attaches on start
        systemctl try-restart "$NAME" || {
            journalctl -u "$NAME" -n 10 --no-pager -o cat >&2 || true
            die "the restart failed: see journalctl -u $NAME"
        }
        did "restarted $NAME"
    fi
else
    systemctl start "$NAME" || {
        journalctl -u "$NAME" -n 10 --no-pager -o cat >&2 || true
        die "$NAME did not start: see journalctl -u $NAME"
    }
    did "started $NAME"
fi
[ "$changed" = 1 ] || say "  nothing to change"
say "$NAME: $(systemctl show -P StatusText "$NAME")"
