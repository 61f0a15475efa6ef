#!/usr/bin/env bash
# Container entrypoint for Spark on Kubernetes: the Spark Operator starts the driver pod with
# `driver <spark-submit args>` and the driver starts executor pods with `executor`; both get
# their settings as SPARK_* environment variables. Anything else runs as a plain command
# (the image's default check, or a local[*] job under `fraud-detection run --platform docker`).
set -euo pipefail

log() { echo "spark-entrypoint: $*" >&2; }

: "${SPARK_HOME:?SPARK_HOME must point at the pyspark installation}"
spark_classpath="${SPARK_CLASSPATH:+${SPARK_CLASSPATH}:}${SPARK_HOME}/jars/*"

# OpenShift runs the container with an arbitrary UID (group 0) that has no passwd entry; the
# JVM's login (Hadoop's UnixLoginModule) then fails on a null user name. Give that UID an entry
# through nss_wrapper (a passwd file in /tmp, preloaded), so /etc/passwd stays read-only.
if ! whoami >/dev/null 2>&1; then
    [ -n "${HOME:-}" ] && [ -w "${HOME}" ] || export HOME=/tmp
    passwd_file="$(mktemp /tmp/passwd.XXXXXX)"
    cat /etc/passwd > "${passwd_file}"
    echo "spark:x:$(id -u):$(id -g):spark (arbitrary uid):${HOME}:/usr/sbin/nologin" >> "${passwd_file}"
    export NSS_WRAPPER_PASSWD="${passwd_file}" NSS_WRAPPER_GROUP=/etc/group
    export LD_PRELOAD="${LD_PRELOAD:+${LD_PRELOAD}:}libnss_wrapper.so"
    log "uid $(id -u) has no passwd entry: named 'spark' through nss_wrapper, HOME=${HOME}"
fi

if [ "${FRAUD_S3A_JARS:-include}" = skip ]; then
    log "this image was built with --skip-s3a-jars: no hadoop-aws/AWS SDK jars, s3a:// paths will fail"
fi

# Extra JVM options Spark passes to executors as SPARK_JAVA_OPT_0, SPARK_JAVA_OPT_1, ...
java_opts=()
while IFS='=' read -r name _; do
    [[ "${name}" == SPARK_JAVA_OPT_* ]] && java_opts+=("${!name}")
done < <(env | sort -t_ -k4 -n)

case "${1:-}" in
    driver)
        shift
        exec "${SPARK_HOME}/bin/spark-submit" \
            --conf "spark.driver.bindAddress=${SPARK_DRIVER_BIND_ADDRESS}" \
            --conf "spark.executorEnv.SPARK_DRIVER_POD_IP=${SPARK_DRIVER_BIND_ADDRESS}" \
            --deploy-mode client \
            "$@"
        ;;
    executor)
        shift
        exec "${JAVA_HOME}/bin/java" "${java_opts[@]}" \
            -Xms"${SPARK_EXECUTOR_MEMORY}" -Xmx"${SPARK_EXECUTOR_MEMORY}" \
            -cp "${spark_classpath}" \
            org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend \
            --driver-url "${SPARK_DRIVER_URL}" \
            --executor-id "${SPARK_EXECUTOR_ID}" \
            --cores "${SPARK_EXECUTOR_CORES}" \
            --app-id "${SPARK_APPLICATION_ID}" \
            --hostname "${SPARK_EXECUTOR_POD_IP}" \
            --resourceProfileId "${SPARK_RESOURCE_PROFILE_ID:-0}" \
            --podName "${SPARK_EXECUTOR_POD_NAME}"
        ;;
    *)
        exec "$@"
        ;;
esac
