#!/usr/bin/env bash
# spark-setup installer: DeepSeek-V4-Flash on an NVIDIA DGX Spark, served by spark-setup's own engine.
#
#   curl -sSL <project URL>/install.sh | bash -s -- --with-mtp --start
#   bash install.sh --from-source . --demo --yes          # from a checkout
#
# What it does: checks the host (Linux, CPU architecture, Python >= 3.10 with venv), creates or reuses a venv at
# <prefix>/venv, installs the spark-setup package into it (from the project's git URL, or from a checkout with
# --from-source DIR), links the CLI at <prefix>/bin/spark-setup (and ~/.local/bin/spark-setup for the default
# prefix), then runs `spark-setup install` with the remaining flags. Re-running upgrades in place.
#
# The whole script is one function, called from a brace group on the last line: a truncated download is a syntax
# error and executes nothing, and the `exit` in that group means bash never reads past it (a copy of this file
# replaced while it runs cannot inject lines).

spark_setup_install() {
    set -eu

    # The project's source, in one place (pip VCS requirement). Override for mirrors and forks.
    local repo_url="${SPARK_SETUP_REPO_URL:-https://github.com/spark-setup/spark-setup.git}"
    local repo_ref="${SPARK_SETUP_REF:-main}"

    local default_prefix="${HOME:?HOME is not set}/.local/share/spark-setup"
    local prefix="${SPARK_SETUP_PREFIX:-$default_prefix}"
    local python="${SPARK_SETUP_PYTHON:-python3}"
    # Extra pip options (e.g. an index mirror, --no-index --find-links DIR); split on spaces.
    local pip_args="${SPARK_SETUP_PIP_ARGS:-}"
    local from_source="" cli_only=0 force=0 prefix_given=0
    local pass=()

    say() { printf '==> %s\n' "$*"; }
    note() { printf '    %s\n' "$*"; }
    die() {
        printf 'install.sh: error: %s\n' "$1" >&2
        [ $# -lt 2 ] || printf 'fix: %s\n' "$2" >&2
        exit "${3:-1}"
    }
    usage() {
        cat <<'EOF'
Usage: install.sh [options] [-- spark-setup install options]

  --prefix DIR        where spark-setup lives (default ~/.local/share/spark-setup; env SPARK_SETUP_PREFIX)
  --models-dir DIR    where model files go (default <prefix>/models)
  --with-mtp          also download the MTP draft model
  --start             start the server when the install is done
  --demo              the CPU demo path (tiny bundled model; no GPU needed)
  --yes, -y           never prompt
  --from-source DIR   install the package from a checkout instead of the project's git URL
  --cli-only          install or upgrade the CLI only; do not run `spark-setup install`
  --force             continue on an unsupported CPU architecture
  -h, --help          this help
Any other option is passed to `spark-setup install`.
Environment: SPARK_SETUP_PYTHON (interpreter, default python3), SPARK_SETUP_PIP_ARGS (extra pip options),
SPARK_SETUP_REPO_URL / SPARK_SETUP_REF (where the package comes from).
EOF
    }
    need_value() {
        [ $# -ge 2 ] && [ -n "$2" ] && case "$2" in --*) false ;; *) true ;; esac ||
            die "$1 needs a value" "see: bash install.sh --help" 2
    }

    while [ $# -gt 0 ]; do
        case "$1" in
            --prefix) need_value "$@"; prefix=$2; prefix_given=1; shift 2 ;;
            --prefix=*) prefix=${1#--prefix=}; prefix_given=1; shift ;;
            --from-source) need_value "$@"; from_source=$2; shift 2 ;;
            --from-source=*) from_source=${1#--from-source=}; shift ;;
            --cli-only) cli_only=1; shift ;;
            --force) force=1; shift ;;
            -h | --help) usage; return 0 ;;
            --) shift; pass+=("$@"); break ;;
            *) pass+=("$1"); shift ;;
        esac
    done

    # -- host ------------------------------------------------------------------------------------------------
    local os arch
    os=$(uname -s)
    arch=$(uname -m)
    [ "$os" = Linux ] || die "spark-setup runs on Linux, this is $os" "use a DGX Spark (DGX OS) or another Linux host"
    case "$arch" in
        aarch64 | arm64) ;;
        x86_64 | amd64)
            case " ${pass[*]+${pass[*]}} " in
                *" --demo "* | *" --target "*) ;;
                *) note "CPU $arch: not a DGX Spark. Use --demo (CPU demo) or '--target generic' for another NVIDIA GPU." ;;
            esac ;;
        *)
            [ "$force" = 1 ] || die "unsupported CPU architecture: $arch" \
                "spark-setup supports aarch64 (DGX Spark) and x86_64; pass --force to try anyway" ;;
    esac

    command -v "$python" >/dev/null 2>&1 ||
        die "$python not found" "install Python 3.10 or newer: sudo apt install python3 python3-venv"
    if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
        die "spark-setup needs Python >= 3.10; $python is $("$python" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo unknown)" \
            "install a newer Python (DGX OS ships 3.12) or point SPARK_SETUP_PYTHON at one"
    fi
    local pyver
    pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

    # -- where the package comes from (checked before anything is created) -------------------------------------
    local req source_desc
    if [ -n "$from_source" ]; then
        [ -f "$from_source/pyproject.toml" ] || die "$from_source is not a spark-setup checkout (no pyproject.toml)" \
            "pass the directory that holds install.sh and pyproject.toml"
        req=$(cd "$from_source" && pwd)
        source_desc=$req
    else
        command -v git >/dev/null 2>&1 ||
            die "git is needed to install from $repo_url" "sudo apt install git, or use --from-source DIR"
        req="spark-setup @ git+$repo_url@$repo_ref"
        source_desc="$repo_url ($repo_ref)"
    fi

    # -- venv ------------------------------------------------------------------------------------------------
    prefix=$(mkdir -p "$prefix" && cd "$prefix" && pwd) || die "cannot create $prefix" "choose another --prefix"
    local venv="$prefix/venv"
    # the CLI gets the resolved prefix (the user's flag may have been relative)
    [ "$prefix_given" = 0 ] || pass=(--prefix "$prefix" ${pass[@]+"${pass[@]}"})
    if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import pip' >/dev/null 2>&1; then
        say "upgrading spark-setup in place ($venv)"
    else
        if ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
            die "Python's venv module or ensurepip is missing (Debian/Ubuntu ship it separately)" \
                "sudo apt install python${pyver}-venv   (or: sudo apt install python3-venv), then re-run"
        fi
        if [ -e "$venv" ]; then
            [ -f "$venv/pyvenv.cfg" ] || die "$venv exists and is not a virtual environment" \
                "move it away or choose another --prefix"
            say "replacing the broken virtual environment at $venv"
            rm -rf -- "$venv"
        fi
        say "creating a virtual environment at $venv (Python $pyver)"
        local venv_log
        if ! venv_log=$("$python" -m venv "$venv" 2>&1); then
            rm -rf -- "$venv"
            printf '%s\n' "$venv_log" >&2
            case "$venv_log" in
                *ensurepip*) die "python -m venv failed: ensurepip is not available" \
                    "sudo apt install python${pyver}-venv, then re-run" ;;
                *) die "python -m venv failed" "see the message above" ;;
            esac
        fi
    fi

    # -- package ---------------------------------------------------------------------------------------------
    say "installing spark-setup from $source_desc (the first time also its dependencies, ~270 MB installed)"
    # shellcheck disable=SC2086  # pip_args is a list of options on purpose
    "$venv/bin/python" -m pip install --disable-pip-version-check --quiet --upgrade $pip_args "$req" ||
        die "pip could not install spark-setup" "see pip's message above; re-running resumes"
    if [ -z "$from_source" ]; then
        # pip always rebuilds a local directory, but a VCS branch at the same version may count as satisfied:
        # reinstall the package itself (dependencies untouched) so re-running really upgrades in place.
        # shellcheck disable=SC2086
        "$venv/bin/python" -m pip install --disable-pip-version-check --quiet --force-reinstall --no-deps \
            $pip_args "$req" || die "pip could not reinstall spark-setup" "see pip's message above"
    fi

    local cli="$venv/bin/spark-setup"
    [ -x "$cli" ] || die "the package installed but $cli is missing" "re-run; if it persists, report it"
    link_cli() {  # leave a correct link untouched, so a re-run changes only the package
        [ -L "$1" ] && [ "$(readlink "$1")" = "$cli" ] || ln -sfn "$cli" "$1"
    }
    mkdir -p "$prefix/bin"
    link_cli "$prefix/bin/spark-setup"
    local version
    version=$("$prefix/bin/spark-setup" --version) || die "the installed CLI does not run" "re-run install.sh"
    say "$version installed: $prefix/bin/spark-setup"

    if [ -d "$default_prefix" ] && [ "$prefix" = "$(cd "$default_prefix" && pwd)" ]; then
        local user_bin="$HOME/.local/bin"
        mkdir -p "$user_bin"
        if [ -e "$user_bin/spark-setup" ] && [ ! -L "$user_bin/spark-setup" ]; then
            note "left $user_bin/spark-setup alone (not a link we made); the CLI is at $prefix/bin/spark-setup"
        else
            link_cli "$user_bin/spark-setup"
            case ":${PATH:-}:" in
                *":$user_bin:"*) ;;
                *) note "$user_bin is not on your PATH; add it:  echo 'export PATH=\"\$HOME/.local/bin:\$PATH\"' >> ~/.bashrc" ;;
            esac
        fi
    fi

    if [ "$cli_only" = 1 ]; then
        say "done (--cli-only): next, run  $prefix/bin/spark-setup install"
        return 0
    fi

    # -- the rest is the CLI's job -----------------------------------------------------------------------------
    # Under `curl | bash` stdin is the script: prompts read the terminal when there is one.
    say "spark-setup install ${pass[*]+${pass[*]}}"
    local rc=0
    if (exec </dev/tty) 2>/dev/null; then
        "$prefix/bin/spark-setup" install ${pass[@]+"${pass[@]}"} </dev/tty || rc=$?
    else
        "$prefix/bin/spark-setup" install ${pass[@]+"${pass[@]}"} </dev/null || rc=$?
    fi
    if [ "$rc" != 0 ]; then
        printf 'install.sh: the CLI is installed (%s) but `spark-setup install` stopped (exit %s)\n' \
            "$prefix/bin/spark-setup" "$rc" >&2
        printf 'fix: fix what it reported above, then re-run: %s install %s\n' \
            "$prefix/bin/spark-setup" "${pass[*]+${pass[*]}}" >&2
        exit "$rc"
    fi
}

{ spark_setup_install "$@"; exit; }
