#!/usr/bin/env bash
# Stand the fraud-detection stack up on a local kind cluster, in one command; safe to rerun.
#
#   ./setup.sh                 kind: cluster, KFP standalone, cert-manager, KServe (Standard mode),
#                              Model Registry, manifests/ (namespace, MinIO, RBAC, settings),
#                              Spark Operator watching fraud-detection, data upload
#   ./setup.sh --openshift     OpenShift AI: apply dspa/ to the current `oc` login, install the
#                              Spark Operator for fraud-detection, upload the data
#   ./setup.sh --dry-run       print every command and manifest in order; change nothing
#   ./setup.sh --skip-data     do not generate and upload data
#   ./setup.sh --skip-spark-operator   the cluster already has one watching fraud-detection
#   ./setup.sh --users N       size of the generated data set (default 20000)
#
# Every install step is idempotent (create-if-absent, apply, helm upgrade --install) and every
# wait has a timeout that names what did not become ready. Versions are pinned below; why each
# is in docs/cluster.md.
set -euo pipefail

# ---------------------------------------------------------------- pinned versions
KIND_CLUSTER="${KIND_CLUSTER:-fraud-detection}"
KIND_NODE_IMAGE="kindest/node:v1.32.2"
# Matches the kfp / kfp-kubernetes SDK in uv.lock (2.16.1).
KFP_VERSION="2.16.1"
CERT_MANAGER_VERSION="v1.17.2"
# Matches the kserve Python package the predictor image is built with (uv.lock: 0.21.0).
KSERVE_VERSION="v0.21.0"
# Matches the model-registry client in uv.lock (0.3.18), which calls the server's /api/model_registry/v1.
MODEL_REGISTRY_VERSION="v0.3.18"
SPARK_OPERATOR_CHART_VERSION="2.5.2"

NAMESPACE="fraud-detection"
KFP_NAMESPACE="kubeflow"
SPARK_OPERATOR_NAMESPACE="spark-operator"
BUCKET="fraud-detection"
WAIT_TIMEOUT="${WAIT_TIMEOUT:-600s}"
MINIO_LOCAL_PORT="${MINIO_LOCAL_PORT:-19000}"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OPENSHIFT=false
DRY_RUN=false
SKIP_DATA=false
SKIP_SPARK_OPERATOR=false
USERS=20000

usage() {
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case "$1" in
        --openshift) OPENSHIFT=true ;;
        --dry-run) DRY_RUN=true ;;
        --skip-data) SKIP_DATA=true ;;
        --skip-spark-operator) SKIP_SPARK_OPERATOR=true ;;
        --users) USERS="${2:?--users needs a number}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "setup.sh: unknown option '$1'" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
case "${USERS}" in
    ''|*[!0-9]*) echo "setup.sh: --users needs a positive number, got '${USERS}'" >&2; exit 2 ;;
esac

log() { printf '\n==> %s\n' "$*"; }
die() { printf 'setup.sh: %s\n' "$*" >&2; exit 1; }

need() {
    local tool
    [ "${DRY_RUN}" = false ] || return 0
    for tool in "$@"; do
        command -v "$tool" >/dev/null 2>&1 || die "'$tool' is required but not on PATH"
    done
}

# run <command...>: print the command (shell-quoted, after "+ "), then run it unless --dry-run.
run() {
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    [ "${DRY_RUN}" = true ] || "$@"
}

# apply_kustomization <local dir>: kubectl apply -k; a dry run also prints the rendered manifest.
apply_kustomization() {
    local dir="$1"
    if [ "${DRY_RUN}" = true ]; then
        command -v kubectl >/dev/null 2>&1 || die "--dry-run renders ${dir} with 'kubectl kustomize': kubectl is not on PATH"
        printf -- '--- manifest %s\n' "${dir#"${REPO_ROOT}"/}"
        kubectl kustomize "${dir}"
        printf -- '--- end manifest\n'
    fi
    run kubectl apply -k "${dir}"
}

# wait_for <what> <kubectl wait args...>: a bounded wait with a message that says what failed.
wait_for() {
    local what="$1"; shift
    echo "    waiting (up to ${WAIT_TIMEOUT}) for ${what}"
    if ! run kubectl wait --timeout="${WAIT_TIMEOUT}" "$@"; then
        die "timed out waiting for ${what}; inspect with: kubectl get pods -A | grep -v Running"
    fi
}

# wait_for_resource <what> <kubectl get args...>: wait until an object exists (kubectl wait
# fails at once on objects that are not there yet, e.g. a CRD a controller installs).
wait_for_resource() {
    local what="$1"; shift
    run kubectl get "$@" -o name
    [ "${DRY_RUN}" = false ] || return 0
    local deadline=$((SECONDS + ${WAIT_TIMEOUT%s}))
    until kubectl get "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || die "timed out waiting for ${what} to appear"
        sleep 5
    done
}

# require_crd <crd> <what installs it>: an operator must be there before its objects are applied.
require_crd() {
    run kubectl get crd "$1" -o name
    [ "${DRY_RUN}" = true ] || kubectl get crd "$1" >/dev/null 2>&1 \
        || die "CRD $1 is missing: install $2 first"
}

# ---------------------------------------------------------------- shared steps
# random_token <bytes>: hex from the kernel's CSPRNG (no openssl needed).
random_token() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }

# ensure_generated_secret <secret> "<KEY> [<KEY>...]" <namespace...>: the Secret in each namespace,
# each key holding a random value generated on the first run: never in the repository, never
# printed, and passed through stdin so no process list shows it. Reruns keep the values found in
# the first namespace that has the Secret (the servers were created with them) and copy them to
# the namespaces that lack it.
ensure_generated_secret() {
    local name="$1" keys="$2" ns key value found="" values=""
    shift 2
    if [ "${DRY_RUN}" = false ]; then
        for ns in "$@"; do
            if kubectl get secret "${name}" -n "${ns}" >/dev/null 2>&1; then found="${ns}"; break; fi
        done
    fi
    for key in ${keys}; do
        if [ -n "${found}" ]; then
            value="$(kubectl get secret "${name}" -n "${found}" -o "jsonpath={.data.${key}}" | base64 -d)"
        else
            value="$(random_token 24)"
        fi
        values="${values}${key}=${value}"$'\n'
    done
    for ns in "$@"; do
        if [ "${DRY_RUN}" = false ] && kubectl get secret "${name}" -n "${ns}" >/dev/null 2>&1; then
            echo "    Secret ${ns}/${name} exists: keeping its values"
            continue
        fi
        echo "+ kubectl create secret generic ${name} -n ${ns} --from-env-file=/dev/stdin  # ${keys}: random"
        if [ "${DRY_RUN}" = false ]; then
            printf '%s' "${values}" | kubectl create secret generic "${name}" -n "${ns}" --from-env-file=/dev/stdin >/dev/null
        fi
        run kubectl label secret "${name}" -n "${ns}" --overwrite app.kubernetes.io/part-of=fraud-detection
    done
}

# install_spark_operator [extra helm args...]: after the namespace exists (the chart creates its
# job-namespace Role and RoleBinding there, and the controller watches only that namespace).
install_spark_operator() {
    if [ "${SKIP_SPARK_OPERATOR}" = true ]; then
        log "Spark Operator: skipped (--skip-spark-operator); it must watch namespace ${NAMESPACE}"
        return 0
    fi
    log "Spark Operator chart ${SPARK_OPERATOR_CHART_VERSION}, watching namespace ${NAMESPACE}"
    run helm repo add spark-operator https://kubeflow.github.io/spark-operator --force-update
    # The project brings its own Spark service account and Role (manifests/base), so the chart
    # creates none in the job namespace.
    run helm upgrade --install spark-operator spark-operator/spark-operator \
        --version "${SPARK_OPERATOR_CHART_VERSION}" \
        --namespace "${SPARK_OPERATOR_NAMESPACE}" --create-namespace \
        --set "spark.jobNamespaces={${NAMESPACE}}" \
        --set spark.serviceAccount.create=false \
        --set spark.rbac.create=false \
        "$@" \
        --wait --timeout "${WAIT_TIMEOUT}"
    wait_for "the Spark Operator" -n "${SPARK_OPERATOR_NAMESPACE}" --for=condition=Available deployment --all
}

# upload_data <namespace> <service>: generate the raw CSVs with the project's own Python and
# write them to the project's object store through a port-forward (no `mc` needed).
upload_data() {
    local ns="$1" svc="$2" key secret pf_pid
    need uv
    log "Generating ${USERS} users of data and uploading to s3://${BUCKET}/data/raw via ${ns}/${svc}"
    if [ "${DRY_RUN}" = true ]; then
        run kubectl get secret fraud-detection-s3 -n "${NAMESPACE}" -o 'jsonpath={.data}'
        run kubectl port-forward -n "${ns}" "${svc}" "${MINIO_LOCAL_PORT}:9000"
        run uv run fraud-detection generate --users "${USERS}" --out "s3://${BUCKET}/data/raw" --no-progress
        return 0
    fi
    key="$(kubectl get secret fraud-detection-s3 -n "${NAMESPACE}" -o jsonpath='{.data.AWS_ACCESS_KEY_ID}' | base64 -d)"
    secret="$(kubectl get secret fraud-detection-s3 -n "${NAMESPACE}" -o jsonpath='{.data.AWS_SECRET_ACCESS_KEY}' | base64 -d)"
    kubectl port-forward -n "${ns}" "${svc}" "${MINIO_LOCAL_PORT}:9000" >/dev/null 2>&1 &
    pf_pid=$!
    # shellcheck disable=SC2064  # expand pf_pid now: the trap must stop this port-forward
    trap "kill ${pf_pid} 2>/dev/null || true" EXIT
    local deadline=$((SECONDS + 60))
    until (exec 3<>"/dev/tcp/127.0.0.1/${MINIO_LOCAL_PORT}") 2>/dev/null; do
        [ "$SECONDS" -lt "$deadline" ] || die "port-forward to ${ns}/${svc} did not open port ${MINIO_LOCAL_PORT} within 60s"
        sleep 1
    done
    (
        cd "${REPO_ROOT}"
        S3_ENDPOINT_URL="http://127.0.0.1:${MINIO_LOCAL_PORT}" \
        AWS_ACCESS_KEY_ID="${key}" AWS_SECRET_ACCESS_KEY="${secret}" \
        FRAUD_DATA_URI="s3://${BUCKET}/data" \
            uv run fraud-detection generate --users "${USERS}" --out "s3://${BUCKET}/data/raw" --no-progress
    )
    kill "${pf_pid}" 2>/dev/null || true
    trap - EXIT
}

# ---------------------------------------------------------------- OpenShift AI path
setup_openshift() {
    need oc kubectl helm
    log "Checking the OpenShift AI operators this project's objects need"
    require_crd datasciencepipelinesapplications.datasciencepipelinesapplications.opendatahub.io \
        "OpenShift AI with Data Science Pipelines enabled"
    require_crd inferenceservices.serving.kserve.io "OpenShift AI with KServe (single-model serving) enabled"
    log "Applying dspa/ (namespace, RBAC, settings, dev MinIO, DataSciencePipelinesApplication)"
    apply_kustomization "${REPO_ROOT}/dspa"
    ensure_generated_secret fraud-detection-s3 "AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY" "${NAMESPACE}"
    wait_for "the development MinIO" -n "${NAMESPACE}" --for=condition=Available deployment/minio
    wait_for_resource "the pipeline server" -n "${NAMESPACE}" deployment/ds-pipeline-fraud-detection
    wait_for "the pipeline server" -n "${NAMESPACE}" --for=condition=Available deployment/ds-pipeline-fraud-detection
    # restricted-v2 SCC assigns UIDs and fsGroups from the project's range: drop the chart's fixed fsGroup 185.
    install_spark_operator \
        --set controller.podSecurityContext.fsGroup=null \
        --set webhook.podSecurityContext.fsGroup=null
    if [ "${SKIP_DATA}" = false ]; then
        upload_data "${NAMESPACE}" svc/minio
    fi
    cat <<EOF

Done. Next steps (OpenShift AI):
  1. Build and push the images:   ./build_images.sh --push <your-registry>
  2. In the OpenShift AI dashboard: Data Science Pipelines > Import pipeline >
     pipeline/fraud-detection-e2e.yaml, then create a run in project ${NAMESPACE}.
  3. Call the predictor: see docs/cluster.md ("Call the endpoint").
EOF
}

# ---------------------------------------------------------------- kind path
create_cluster() {
    if [ "${DRY_RUN}" = false ] && kind get clusters 2>/dev/null | grep -qx "${KIND_CLUSTER}"; then
        log "kind cluster '${KIND_CLUSTER}' exists: reusing it"
    else
        log "Creating kind cluster '${KIND_CLUSTER}' (${KIND_NODE_IMAGE}) unless it exists"
        run kind create cluster --name "${KIND_CLUSTER}" --image "${KIND_NODE_IMAGE}" --wait 180s
    fi
    run kubectl config use-context "kind-${KIND_CLUSTER}"
}

install_kfp() {
    log "Kubeflow Pipelines ${KFP_VERSION} (standalone, platform-agnostic; its own store is SeaweedFS)"
    run kubectl apply -k "github.com/kubeflow/pipelines/manifests/kustomize/cluster-scoped-resources?ref=${KFP_VERSION}"
    wait_for "the KFP CRDs" --for=condition=established crd/applications.app.k8s.io
    run kubectl apply -k "github.com/kubeflow/pipelines/manifests/kustomize/env/platform-agnostic?ref=${KFP_VERSION}"
    wait_for "the KFP API server" -n "${KFP_NAMESPACE}" --for=condition=Available deployment/ml-pipeline
    wait_for "the KFP UI" -n "${KFP_NAMESPACE}" --for=condition=Available deployment/ml-pipeline-ui
}

install_cert_manager() {
    log "cert-manager ${CERT_MANAGER_VERSION} (KServe's webhook certificates)"
    run kubectl apply -f "https://github.com/cert-manager/cert-manager/releases/download/${CERT_MANAGER_VERSION}/cert-manager.yaml"
    wait_for "cert-manager" -n cert-manager --for=condition=Available deployment --all
}

install_kserve() {
    # Since v0.17 the CRDs and the controller are separate charts (kserve-crd, kserve-resources).
    log "KServe ${KSERVE_VERSION} in Standard mode (plain Deployment + Service: no Knative, no Istio)"
    run helm upgrade --install kserve-crd oci://ghcr.io/kserve/charts/kserve-crd \
        --version "${KSERVE_VERSION}" --namespace kserve --create-namespace --wait --timeout "${WAIT_TIMEOUT}"
    # The chart's default mode is Knative. No ingress controller on kind: the predictor is reached
    # through its cluster Service (port-forward), so KServe creates no Ingress.
    run helm upgrade --install kserve-resources oci://ghcr.io/kserve/charts/kserve-resources \
        --version "${KSERVE_VERSION}" --namespace kserve --create-namespace \
        --set kserve.version="${KSERVE_VERSION}" \
        --set kserve.controller.deploymentMode=Standard \
        --set kserve.controller.gateway.disableIngressCreation=true \
        --wait --timeout "${WAIT_TIMEOUT}"
    wait_for "the KServe controller" -n kserve --for=condition=Available deployment/kserve-controller-manager
}

install_model_registry() {
    log "Kubeflow Model Registry ${MODEL_REGISTRY_VERSION} (in ${KFP_NAMESPACE}, with its MySQL)"
    run kubectl apply -n "${KFP_NAMESPACE}" \
        -k "github.com/kubeflow/model-registry/manifests/kustomize/overlays/db?ref=${MODEL_REGISTRY_VERSION}"
    wait_for "the model registry" -n "${KFP_NAMESPACE}" --for=condition=Available deployment/model-registry-deployment
}

apply_manifests() {
    log "Project manifests (namespace, MinIO, service accounts, RBAC, settings) and generated S3 keys"
    apply_kustomization "${REPO_ROOT}/manifests"
    wait_for_resource "namespace ${NAMESPACE}" namespace "${NAMESPACE}"
    # KFP standalone runs the steps in ${KFP_NAMESPACE}: the same keys there.
    ensure_generated_secret fraud-detection-s3 "AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY" "${NAMESPACE}" "${KFP_NAMESPACE}"
    wait_for "the project's MinIO" -n "${NAMESPACE}" --for=condition=Available deployment/minio
}

# ---------------------------------------------------------------- online store (Redis)
install_online_store() {
    log "The shared online store (Redis, AOF on a PersistentVolumeClaim) and its generated password"
    # Its password: the predictor's namespace and KFP's, where the feature step runs.
    ensure_generated_secret fraud-online-store FRAUD_ONLINE_STORE_PASSWORD "${NAMESPACE}" "${KFP_NAMESPACE}"
    wait_for "the online store (Redis)" -n "${NAMESPACE}" --for=jsonpath='{.status.readyReplicas}'=1 statefulset/fraud-online-store
}

setup_kind() {
    need kind kubectl helm
    create_cluster
    install_kfp
    install_cert_manager
    install_kserve
    install_model_registry
    apply_manifests
    install_online_store
    install_spark_operator
    if [ "${SKIP_DATA}" = false ]; then
        upload_data "${NAMESPACE}" svc/minio
    fi
    cat <<EOF

Done. Next steps (kind):
  1. Build the images and load them into the cluster:
       ./build_images.sh --kind ${KIND_CLUSTER}
  2. Open the KFP UI:   kubectl port-forward -n ${KFP_NAMESPACE} svc/ml-pipeline-ui 8080:80
     then http://localhost:8080 > Pipelines > Upload pipeline > pipeline/fraud-detection-e2e.yaml > Create run
  3. Call the predictor once the run finished:
       kubectl port-forward -n ${NAMESPACE} svc/fraud-detection-predictor 8081:80
       see docs/cluster.md ("Call the endpoint") for the request.
  Clean up finished runs:  ./clear_runs.sh --namespace ${NAMESPACE} --dry-run
EOF
}

if [ "${DRY_RUN}" = true ]; then
    echo "# setup.sh --dry-run: every command and manifest in order; nothing is changed"
fi
if [ "${OPENSHIFT}" = true ]; then
    setup_openshift
else
    setup_kind
fi
