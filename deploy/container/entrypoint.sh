#!/usr/bin/env bash
# Entry point of the fedtune image. The first argument picks the role; every role runs the same
# deploy/*.sh wrapper as a bare-metal install, so flags and file names cannot drift apart.
#
#   superlink [ARGS]      coordinator: deploy/start-superlink.sh $FEDTUNE_OPERATOR_DIR ARGS
#   supernode [ARGS]      site agent:  deploy/start-supernode.sh $FEDTUNE_SITE_DIR ARGS
#   register [SITE ...]   operator: deploy/register-sites.sh (default: every site-keys/*.pub)
#   run [FLWR RUN ARGS]   operator: deploy/run.sh with the fedtune app installed in the image
#   flwr ARGS             operator: Flower's CLI against that SuperLink (flwr ls, flwr log RUN_ID, ...)
#   healthcheck [ADDR]    exit 0 if the gRPC health server at ADDR (default 127.0.0.1:8081) is SERVING
#   anything else         executed as given (fedtune, bash, ...)
#
# register, run and flwr first write $FEDTUNE_OPERATOR_DIR/flwr-home/config.toml (a writable tmpfs or
# emptyDir) for the SuperLink at $FEDTUNE_SUPERLINK (host:port, a name in its certificate),
# verified with $FEDTUNE_OPERATOR_DIR/ca.pem.
set -euo pipefail
src="${FEDTUNE_SRC:-/opt/fedtune/src}"  # pyproject.toml, the packages, deploy/*.sh
op="${FEDTUNE_OPERATOR_DIR:-/operator}"
site="${FEDTUNE_SITE_DIR:-/site}"

flower_config() {
  : "${FEDTUNE_SUPERLINK:?set FEDTUNE_SUPERLINK=host:port, a name in the SuperLink certificate}"
  [ -f "$op/ca.pem" ] || { echo "error: $op/ca.pem not found (mount the federation's CA)" >&2; exit 2; }
  mkdir -p "$op/flwr-home"
  python - "$FEDTUNE_SUPERLINK" "$op/ca.pem" >"$op/flwr-home/config.toml" <<'PY'
import sys
from pathlib import Path

from fedtune.provision import flower_config_toml

sys.stdout.write(flower_config_toml("fedtune", sys.argv[1], Path(sys.argv[2])))
PY
}

role="${1:-}"
[ $# -gt 0 ] && shift
case "$role" in
  superlink) exec "$src/deploy/start-superlink.sh" "$op" "$@" ;;
  supernode) exec "$src/deploy/start-supernode.sh" "$site" "$@" ;;
  register)
    flower_config
    if [ $# -eq 0 ]; then
      for key in "$op"/site-keys/*.pub; do
        [ -e "$key" ] || { echo "error: no $op/site-keys/*.pub to register" >&2; exit 2; }
        set -- "$@" "$(basename "$key" .pub)"
      done
    fi
    exec "$src/deploy/register-sites.sh" "$op" "$@" ;;
  run)
    flower_config
    exec "$src/deploy/run.sh" "$op" "$src" -- "$@" ;;
  flwr)
    flower_config
    export FLWR_HOME="$op/flwr-home"
    exec flwr "$@" ;;
  healthcheck)
    exec python - "${1:-127.0.0.1:8081}" <<'PY'
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

with grpc.insecure_channel(sys.argv[1]) as channel:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
sys.exit(0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1)
PY
    ;;
  "") exec fedtune --help ;;
  *) exec "$role" "$@" ;;
esac
