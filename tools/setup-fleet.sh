#!/usr/bin/env bash
# Install what tests/test_fleet.py and perf/fleet.py need besides llmsup: HAProxy (Debian's
# package) as the balancer, iproute2 for the network namespaces the nodes run in, taskset
# (util-linux) to give each node a core. Idempotent. Prints why and exits non-zero when
# something cannot be installed; the fleet tests then skip and say why.
set -euo pipefail

fail() { echo "setup-fleet: $*" >&2; exit 1; }

missing=()
command -v haproxy >/dev/null || missing+=(haproxy)
command -v ip >/dev/null || missing+=(iproute2)
command -v taskset >/dev/null || missing+=(util-linux)
((${#missing[@]})) || exit 0
[ "$(id -u)" = 0 ] || fail "need ${missing[*]}: run as root (the fleet tests need root anyway)"
command -v apt-get >/dev/null || fail "need ${missing[*]} but there is no apt-get"
echo "setup-fleet: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
log=/tmp/setup-fleet-apt.log
if ! apt-get install -y -q "${missing[@]}" >"$log" 2>&1; then
    apt-get update -q >>"$log" 2>&1 || fail "apt-get update failed (log: $log)"
    apt-get install -y -q "${missing[@]}" >>"$log" 2>&1 || fail "apt-get install failed (log: $log)"
fi
