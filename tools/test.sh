#!/usr/bin/env bash
# The whole test suite, from a clean clone, installing everything it needs (README's test command; CI runs it).
#   - a venv at .venv with the package (editable) and its test extra (torch 2.13 CPU, transformers, openai, ...)
#   - as root on Debian/Ubuntu: systemd-container + debootstrap for the real-systemd lifecycle test
#   - then pytest over tests/ (extra pytest arguments pass through: bash tools/test.sh -k download)
main() {
    set -eu
    cd "$(dirname "$0")/.."
    local py=${PYTHON:-python3}
    if [ ! -x .venv/bin/python ]; then
        echo "==> creating .venv"
        "$py" -m venv .venv
    fi
    echo "==> installing spark-setup[test] into .venv"
    .venv/bin/python -m pip install -q --disable-pip-version-check -U pip
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        local need=()
        command -v systemd-nspawn >/dev/null 2>&1 || need+=(systemd-container)
        command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
        command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
        if [ ${#need[@]} -gt 0 ]; then
            echo "==> apt-get install ${need[*]}"
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
        fi
    fi
    echo "==> pytest"
    exec .venv/bin/python -m pytest -q -ra "$@"
}
main "$@"
