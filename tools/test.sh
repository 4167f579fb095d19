#!/usr/bin/env bash
# Set everything up (idempotent) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/tools/setup.sh"
# The C and Node.js clients' toolchains. If they cannot be installed, their tests skip and
# say why; the rest of the suite still runs.
bash "$root/tools/setup-clients.sh" ||
  echo "test.sh: tools/setup-clients.sh failed: the C/Node.js client tests will skip" >&2
# HAProxy and network namespaces for the fleet tests; without them those tests skip.
bash "$root/tools/setup-fleet.sh" ||
  echo "test.sh: tools/setup-fleet.sh failed: the fleet tests will skip" >&2
cd "$root"
venv=${LLMSUP_VENV:-$root/.venv}
# The layer rules (.importlinter, docs/architecture.md): a wrong import fails the run here.
"$venv/bin/lint-imports" --config "$root/.importlinter"
exec "$venv/bin/python" -m pytest "$@"
