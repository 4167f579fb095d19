#!/usr/bin/env bash
# Install and build what the C and Node.js clients need (clients/c, clients/node).
# Idempotent; a second run only checks (well under a second when nothing changed).
#   C:    libzmq3-dev, libjansson-dev (apt), then make -C clients/c
#   Node: npm ci --prefix clients/node (zeromq v6 ships its prebuilt binary in the package)
# Prints why and exits non-zero when something cannot be installed or built.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "setup-clients: $*" >&2; exit 1; }

# --- C: headers and libraries from Debian --------------------------------------------------
missing=()
dpkg-query -W -f='${Status}' libzmq3-dev 2>/dev/null | grep -q 'ok installed' || missing+=(libzmq3-dev)
dpkg-query -W -f='${Status}' libjansson-dev 2>/dev/null | grep -q 'ok installed' || missing+=(libjansson-dev)
if ((${#missing[@]})); then
    command -v apt-get >/dev/null || fail "need ${missing[*]} but there is no apt-get; install them by hand"
    sudo=()
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || fail "need ${missing[*]}: run as root or install sudo"
        sudo=(sudo)
    fi
    echo "setup-clients: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # apt-get update only when the package lists do not know the packages yet.
    if ! "${sudo[@]}" apt-get install -y -q "${missing[@]}" >/tmp/setup-clients-apt.log 2>&1; then
        "${sudo[@]}" apt-get update -q >>/tmp/setup-clients-apt.log 2>&1 \
            || fail "apt-get update failed (log: /tmp/setup-clients-apt.log)"
        "${sudo[@]}" apt-get install -y -q "${missing[@]}" >>/tmp/setup-clients-apt.log 2>&1 \
            || fail "apt-get install ${missing[*]} failed (log: /tmp/setup-clients-apt.log)"
    fi
fi
command -v cc >/dev/null || fail "no C compiler (cc): install gcc"
command -v make >/dev/null || fail "no make: install make"
make -s -C clients/c || fail "building clients/c failed"

# --- Node.js -------------------------------------------------------------------------------
command -v node >/dev/null || fail "no node: install Node.js 18 or later"
command -v npm >/dev/null || fail "no npm: install npm"
major=$(node -p 'process.versions.node.split(".")[0]')
[ "$major" -ge 18 ] || fail "node $(node -v) is too old: need 18 or later"
stamp=clients/node/node_modules/.package-lock.json
if [ ! -f "$stamp" ] || [ clients/node/package-lock.json -nt "$stamp" ] \
    || ! node -e 'require(process.argv[1])' "$PWD/clients/node/node_modules/zeromq" 2>/dev/null; then
    echo "setup-clients: npm ci --prefix clients/node"
    npm ci --prefix clients/node --no-audit --no-fund --loglevel=error \
        || fail "npm ci in clients/node failed"
    node -e 'require(process.argv[1])' "$PWD/clients/node/node_modules/zeromq" \
        || fail "the zeromq package installed but does not load (no prebuilt binary for this platform?)"
fi
echo "setup-clients: C and Node.js clients ready"
