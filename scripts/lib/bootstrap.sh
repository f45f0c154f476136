# Sourced by scripts/test and scripts/demo: make a fresh Debian machine ready.
# Installs host packages with apt when missing and the project into .venv.
set -euo pipefail

zv_log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

zv_apt() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    zv_log "apt-get install ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

zv_bootstrap() {
    zv_apt python3 python3-venv python3-pip openssh-client ca-certificates openssl debootstrap buildah mmdebstrap \
        gcc libc6-dev
    if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import zvolt' 2>/dev/null \
        || [ pyproject.toml -nt .venv/.installed ]; then
        zv_log "python venv .venv with the project and its dev dependencies"
        python3 -m venv .venv
        .venv/bin/pip install -q --upgrade pip
        .venv/bin/pip install -q -e '.[dev,kube]'
        touch .venv/.installed
    fi
    export PATH="$PWD/.venv/bin:$PATH"
}
