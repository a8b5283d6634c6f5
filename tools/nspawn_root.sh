#!/usr/bin/env bash
# Prepare (once, cached) a Debian bookworm root that boots a real systemd under systemd-nspawn, for the
# service lifecycle tests (tests/test_systemd_lifecycle.py); prints the root's path on stdout.
#   needs: root, debootstrap, systemd-container (apt-get install -y debootstrap systemd-container)
#   cache: $SPARK_SETUP_NSPAWN_ROOT (default /var/cache/spark-setup/nspawn-bookworm); rebuilt when the package
#          list below changes. The tests boot it with --volatile=overlay, so the cached root is never modified.
main() {
    set -eu
    local root=${SPARK_SETUP_NSPAWN_ROOT:-/var/cache/spark-setup/nspawn-bookworm}
    local mirror=${SPARK_SETUP_DEBIAN_MIRROR:-http://deb.debian.org/debian}
    # systemd + dbus boot it (libpam-systemd: user managers for --user units); python3 and these libraries let a
    # bind-mounted venv (and its interpreter) run; g++ and make build the engine for `install` inside.
    local include=systemd,systemd-sysv,dbus,python3,libstdc++6,libgomp1,libssl3,libffi8,libsqlite3-0,libbz2-1.0
    include=$include,liblzma5,zlib1g,libreadline8,libncursesw6,procps,curl,libpam-systemd,g++,make
    local stamp="$root/.spark-setup-root"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$include" ]; then
        echo "$root"
        return 0
    fi
    if [ "$(id -u)" != 0 ]; then
        echo "nspawn_root.sh: must run as root (debootstrap)" >&2
        return 1
    fi
    command -v debootstrap >/dev/null || { echo "nspawn_root.sh: apt-get install -y debootstrap" >&2; return 1; }
    mkdir -p "$(dirname "$root")"
    exec 9>"$root.lock"
    flock 9
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$include" ]; then  # built by another run while we waited
        echo "$root"
        return 0
    fi
    local tmp="$root.tmp.$$"
    rm -rf "$tmp"
    echo "nspawn_root.sh: debootstrap bookworm into $root (about a minute)" >&2
    debootstrap --variant=minbase --include="$include" bookworm "$tmp" "$mirror" >"$tmp.log" 2>&1 || {
        tail -20 "$tmp.log" >&2
        rm -rf "$tmp"
        return 1
    }
    rm -f "$tmp.log"
    chmod 711 "$tmp/root"  # a bind-mounted interpreter under /root (pyenv) stays reachable for service users
    echo "$include" >"$tmp/.spark-setup-root"
    rm -rf "$root"
    mv "$tmp" "$root"
    echo "$root"
}
main "$@"
