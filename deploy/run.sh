#!/usr/bin/env bash
# Launch a federated run on the deployed federation with Flower's own `flwr run`.
#
#   deploy/run.sh OPERATOR_DIR [APP_DIR] -- [flwr run args, e.g. --run-config "num-server-rounds=3 model-dir='/abs/model' out-dir='/abs/runs/r1'"]
#
# APP_DIR is the fedtune project folder (default: this repository). Streams the run's log; the
# coordinator writes adapter/, metrics.jsonl and summary.json into the run config's out-dir on the
# SuperLink host. Watch it with: FLWR_HOME=OPERATOR_DIR/flwr-home flwr ls / flwr log RUN_ID
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/_common.sh"
[ $# -ge 1 ] || { sed -n 2,8p "$0" >&2; exit 2; }
op="$(cd "$1" && pwd)"; shift
app="$(cd "$here/.." && pwd)"
if [ $# -gt 0 ] && [ "$1" != "--" ]; then app="$(cd "$1" && pwd)"; shift; fi
[ "${1:-}" = "--" ] && shift
export FLWR_HOME="$op/flwr-home"
need_file "$FLWR_HOME/config.toml" "run fedtune deploy provision first"
exec flwr run "$app" fedtune --stream "$@"
