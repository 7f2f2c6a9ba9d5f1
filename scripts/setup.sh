# Sourced by demo.sh and test.sh: install what is missing, then activate the project's venv.
# System packages come from apt (only when missing); Python packages from pip into .venv, reinstalled
# only when pyproject.toml changed, so a second run starts at once.

_fsmount_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

_need_apt=()
for pkg in fuse3 libfuse3-dev pkg-config; do
    dpkg -s "$pkg" >/dev/null 2>&1 || _need_apt+=("$pkg")
done
if [ ${#_need_apt[@]} -gt 0 ]; then
    echo "setup: installing ${_need_apt[*]} with apt-get" >&2
    _sudo=""; [ "$(id -u)" -eq 0 ] || _sudo="sudo"
    $_sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $_sudo apt-get install -y -qq "${_need_apt[@]}" >/dev/null
fi

_venv="$_fsmount_root/.venv"
if [ ! -x "$_venv/bin/python" ]; then
    echo "setup: creating $_venv" >&2
    python3 -m venv "$_venv"
fi
_stamp="$_venv/.fsmount-installed"
_want="$(sha256sum "$_fsmount_root/pyproject.toml" | cut -d' ' -f1) compat"
if [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]; then
    echo "setup: installing fsmount and its test dependencies into $_venv" >&2
    # Editable as a plain path entry: with setuptools' default import hook every command's
    # interpreter took 40 ms to start instead of 10.
    "$_venv/bin/pip" install -q --disable-pip-version-check --config-settings editable_mode=compat \
        -e "$_fsmount_root[test]" 2>&1 \
        | grep -v "^WARNING: Location" >&2 || true
    "$_venv/bin/python" -c "import fsmount, backend, pyfuse3, trio" || { echo "setup: install failed" >&2; exit 1; }
    echo "$_want" > "$_stamp"
fi
export PATH="$_venv/bin:$PATH"
