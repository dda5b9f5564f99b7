#!/usr/bin/env bash
# Start this site's SuperNode: TLS to the SuperLink, node authentication, the site's own policy.
#
#   deploy/start-supernode.sh SITE_DIR [--superlink HOST:PORT] [--port 9094] [--worker SOCKET] [--insecure] [extra flower-supernode args]
#
# SITE_DIR is the sites/<name>/ folder handed over by the operator; the SuperLink address defaults
# to SUPERLINK in SITE_DIR/site.env. --port is this SuperNode's local ClientApp API port (each
# SuperNode on one machine needs its own). --worker hands every round to the site worker
# (`fedtune site serve SITE_DIR/policy.toml --socket SOCKET`), which keeps model and data warm.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/_common.sh"
[ $# -ge 1 ] || { sed -n 2,9p "$0" >&2; exit 2; }
site="$(cd "$1" && pwd)"; shift
superlink="" port=9094 insecure=0 worker="" extra=()
[ -f "$site/site.env" ] && superlink="$(sed -n 's/^SUPERLINK=//p' "$site/site.env")"
while [ $# -gt 0 ]; do
  case "$1" in
    --superlink) superlink="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --worker) worker="$2"; shift 2 ;;
    --insecure) insecure=1; shift ;;
    *) extra+=("$1"); shift ;;
  esac
done
[ -n "$superlink" ] || { echo "error: no SuperLink address (site.env or --superlink)" >&2; exit 2; }
need_file "$site/policy.toml" "the site policy"
export FLWR_HOME="${FLWR_HOME:-$site/flwr-home}"  # where this SuperNode unpacks the app it runs
node_config="policy='$site/policy.toml'"
[ -n "$worker" ] && node_config="$node_config worker='$worker'"
if [ "$insecure" = 1 ]; then
  insecure_warning
  exec flower-supernode --insecure --superlink "$superlink" --host 127.0.0.1 --port "$port" \
    --node-config "$node_config" "${extra[@]}"
fi
need_file "$site/ca.pem" "the federation's CA certificate"
need_file "$site/node-auth.key" "this site's node-authentication key"
exec flower-supernode --superlink "$superlink" --root-certificates "$site/ca.pem" \
  --auth-supernode-private-key "$site/node-auth.key" --host 127.0.0.1 --port "$port" \
  --node-config "$node_config" "${extra[@]}"
