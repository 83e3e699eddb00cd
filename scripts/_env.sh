# Sourced by the other scripts: finds a Python >= 3.12 and keeps .venv in step with pyproject.toml.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

find_python() {
    local candidates=() v
    [ -n "${CQRS_PYTHON:-}" ] && candidates+=("$CQRS_PYTHON")
    candidates+=(python3.13 python3.12 python3)
    if command -v pyenv >/dev/null 2>&1; then
        for v in $(pyenv versions --bare 2>/dev/null | sort -rV); do
            candidates+=("$(pyenv root)/versions/$v/bin/python3")
        done
    fi
    for p in "${candidates[@]}"; do
        if command -v "$p" >/dev/null 2>&1 &&
            "$p" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
            command -v "$p"
            return 0
        fi
    done
    echo "moleculerpy-cqrs needs Python >= 3.12; none found (set CQRS_PYTHON to one)." >&2
    return 1
}

# ensure_venv [EXTRA]: .venv with the package (editable) and, when given, one of its extras
# (`dev` for the tests). Each set has its own stamp holding pyproject.toml's hash, so the demo's
# environment stays small and `./scripts/test` adds only what it needs on top of it.
ensure_venv() {
    local extra="${1:-}" want stamp spec
    want="$(sha256sum <"$ROOT/pyproject.toml" | cut -c1-16)"
    stamp="$VENV/.installed-${extra:-base}"
    spec="$ROOT${extra:+[$extra]}"
    if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        return 0
    fi
    if [ -z "$extra" ] && [ "$(cat "$VENV/.installed-dev" 2>/dev/null)" = "$want" ]; then
        return 0  # the development set holds the package too
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        local py
        py="$(PYENV_VERSION= find_python)"
        echo "Creating $VENV with $py" >&2
        "$py" -m venv "$VENV"
    fi
    local log="$VENV/install${extra:+-$extra}.log"
    echo "Installing moleculerpy-cqrs${extra:+ with its $extra extras} into $VENV (log: $log)" >&2
    if ! "$VENV/bin/python" -m pip install --disable-pip-version-check -e "$spec" >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        echo "Installing failed; the whole log is in $log" >&2
        return 1
    fi
    echo "$want" >"$stamp"
}

# ensure_chromium: Debian's chromium for the browser test (tests/face/test_browser.py), installed
# with apt-get when it is missing (as root, or through sudo). Playwright drives it through its
# executable path: its own browser download is not used.
ensure_chromium() {
    if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
        return 0
    fi
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo="sudo"
        else
            echo "The browser test needs chromium: install it (apt-get install chromium) as root." >&2
            return 1
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "The browser test needs chromium, and this machine has no apt-get: install chromium." >&2
        return 1
    fi
    echo "Installing chromium for the browser test (apt-get; log: $ROOT/.venv/install-chromium.log)" >&2
    mkdir -p "$ROOT/.venv"
    if ! { $sudo apt-get update && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y chromium; } \
        >"$ROOT/.venv/install-chromium.log" 2>&1; then
        tail -n 20 "$ROOT/.venv/install-chromium.log" >&2
        echo "Installing chromium failed; the whole log is in $ROOT/.venv/install-chromium.log" >&2
        return 1
    fi
}
