#!/usr/bin/env bash
# Register every provisioned site's node-authentication public key with the running SuperLink.
#
#   deploy/register-sites.sh OPERATOR_DIR [SITE ...]      (default: every key in OPERATOR_DIR/site-keys/)
#
# Uses Flower's own CLI (`flwr supernode register`) with FLWR_HOME=OPERATOR_DIR/flwr-home.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/_common.sh"
[ $# -ge 1 ] || { sed -n 2,6p "$0" >&2; exit 2; }
op="$(cd "$1" && pwd)"; shift
export FLWR_HOME="$op/flwr-home"
need_file "$FLWR_HOME/config.toml" "run fedtune deploy provision first"
if [ $# -eq 0 ]; then
  set -- $(cat "$op/sites.txt")
fi
for site in "$@"; do
  need_file "$op/site-keys/$site.pub" "no key provisioned for site '$site'"
  echo "registering $site"
  flwr supernode register "$op/site-keys/$site.pub" --name "$site"
done
flwr supernode list
