#!/usr/bin/env bash
# Start the SuperLink with TLS and SuperNode authentication (the only secure default).
#
#   deploy/start-superlink.sh OPERATOR_DIR [--host 0.0.0.0] [--port 8000] [--insecure] [extra flower-superlink args]
#
# OPERATOR_DIR is the operator/ folder written by `fedtune deploy provision`. The SuperLink's
# state (runs, registered nodes) is kept in OPERATOR_DIR/state/superlink.db across restarts.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/_common.sh"
[ $# -ge 1 ] || { sed -n 2,7p "$0" >&2; exit 2; }
op="$(cd "$1" && pwd)"; shift
host=0.0.0.0 port="" insecure=0 extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --insecure) insecure=1; shift ;;
    *) extra+=("$1"); shift ;;
  esac
done
if [ -z "$port" ]; then  # the port provisioned into the Flower config
  port="$(sed -n 's/^address = ".*:\([0-9]*\)"$/\1/p' "$op/flwr-home/config.toml" | head -1)"
  port="${port:-8000}"
fi
mkdir -p "$op/state"
export FLWR_HOME="${FLWR_HOME:-$op/flwr-home}"  # where the SuperLink unpacks submitted apps
if [ "$insecure" = 1 ]; then
  insecure_warning
  exec flower-superlink --insecure --host "$host" --port "$port" \
    --database "$op/state/superlink.db" --disable-runtime-dependency-installation "${extra[@]}"
fi
need_file "$op/superlink.pem" "run fedtune deploy provision first"
need_file "$op/superlink.key" "run fedtune deploy provision first"
need_file "$op/ca.pem" "run fedtune deploy provision first"
exec flower-superlink \
  --ssl-ca-certfile "$op/ca.pem" --ssl-certfile "$op/superlink.pem" --ssl-keyfile "$op/superlink.key" \
  --enable-supernode-auth --host "$host" --port "$port" \
  --database "$op/state/superlink.db" --disable-runtime-dependency-installation "${extra[@]}"
