#!/usr/bin/env bash
# Remove this project's leftovers from one namespace: SparkApplications, InferenceServices and
# finished (Succeeded/Failed) pods that carry the label app.kubernetes.io/part-of=fraud-detection.
#
#   ./clear_runs.sh --namespace fraud-detection [--dry-run] [--keep-serving]
#
# The namespace is required (never "whatever is current"), only labelled objects are selected,
# and every object is printed before it is deleted. --dry-run prints and deletes nothing;
# --keep-serving leaves the InferenceServices (the live predictor) alone.
set -euo pipefail

SELECTOR="app.kubernetes.io/part-of=fraud-detection"
NAMESPACE=""
DRY_RUN=false
KEEP_SERVING=false

usage() {
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case "$1" in
        -n|--namespace) NAMESPACE="${2:-}"; shift ;;
        --namespace=*) NAMESPACE="${1#--namespace=}" ;;
        --dry-run) DRY_RUN=true ;;
        --keep-serving) KEEP_SERVING=true ;;
        -h|--help) usage; exit 0 ;;
        *) echo "clear_runs.sh: unknown option '$1'" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

if [ -z "${NAMESPACE}" ]; then
    echo "clear_runs.sh: --namespace is required (this script never uses the current context's namespace)" >&2
    usage >&2
    exit 2
fi

command -v kubectl >/dev/null 2>&1 || { echo "clear_runs.sh: kubectl is not on PATH" >&2; exit 1; }

# delete_labelled <what> <kubectl get args...>: list matching objects, print them, delete unless dry run.
delete_labelled() {
    local what="$1"; shift
    local names
    names="$(kubectl get "$@" --namespace "${NAMESPACE}" --selector "${SELECTOR}" -o name)"
    if [ -z "${names}" ]; then
        echo "no ${what} to delete in ${NAMESPACE}"
        return 0
    fi
    local name
    while IFS= read -r name; do
        if [ "${DRY_RUN}" = true ]; then
            echo "would delete ${name} (namespace ${NAMESPACE})"
        else
            echo "deleting ${name} (namespace ${NAMESPACE})"
        fi
    done <<< "${names}"
    if [ "${DRY_RUN}" = false ]; then
        # shellcheck disable=SC2086  # one object name per word is intended
        kubectl delete --namespace "${NAMESPACE}" --wait=false ${names}
    fi
}

delete_labelled "SparkApplications" sparkapplications.sparkoperator.k8s.io
if [ "${KEEP_SERVING}" = false ]; then
    delete_labelled "InferenceServices" inferenceservices.serving.kserve.io
fi
delete_labelled "succeeded pods" pods --field-selector=status.phase==Succeeded
delete_labelled "failed pods" pods --field-selector=status.phase==Failed
