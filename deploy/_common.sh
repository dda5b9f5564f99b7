# Shared by the deploy/*.sh wrappers (sourced, not run).
# Offline, on-prem defaults; each can be overridden from the environment.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
export TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS="${TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS:-}"
export FLWR_DISABLE_UPDATE_CHECK="${FLWR_DISABLE_UPDATE_CHECK:-1}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="${FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION:-1}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"

insecure_warning() {
  echo "WARNING: --insecure: TLS and SuperNode authentication are OFF. Traffic (model updates," >&2
  echo "WARNING: site metrics) is unencrypted and any process can join as a site. Testing only." >&2
}

need_file() {
  [ -f "$1" ] || { echo "error: $1 not found ($2)" >&2; exit 2; }
}
