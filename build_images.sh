#!/usr/bin/env bash
# Build every step image with one tag, using podman or docker (whichever works here).
#
#   ./build_images.sh                          build all images as <registry>/<step>:<tag>
#   ./build_images.sh --skip-s3a-jars          no hadoop-aws/AWS SDK jars in the Spark image
#                                              (no Maven access; s3a:// then fails, the image says so)
#   ./build_images.sh --tag 0.2.0              another tag (default: pipeline/images.py TAG)
#   ./build_images.sh --push quay.io/me        build as quay.io/me/<step>:<tag> and push
#   ./build_images.sh --kind fraud-detection   load the images into that kind cluster
#   ./build_images.sh --only train             build one step (repeatable)
#   ./build_images.sh --verbose                stream the build output instead of logging it
#   ./build_images.sh --no-cache               rebuild every layer (the bench's cold build)
#
# First the shared builder/runtime stages (containers/Containerfile.base), then each step's
# Containerfile, then the code-version stamp on it (containers/Containerfile.stamp).
# Quiet by default: each build's output goes to <log dir>/<image>.log and one line
# per image says how it went (time, size). A failed image does not stop the others; the exit
# status is non-zero if any failed. Image names come from pipeline/images.py, the same place
# the pipeline takes them from. The images' IDs (and, after --push, their registry digests) are
# written to pipeline/images.lock.json so the pipeline can name them by digest.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "${REPO_ROOT}"

read -r REGISTRY TAG < <(python3 -c 'import sys; sys.path.insert(0, "."); from pipeline.images import REGISTRY, TAG; print(REGISTRY, TAG)')
PUSH=false
KIND_CLUSTER=""
ONLY=()
S3A_JARS=include
VERBOSE=false
NO_CACHE=()
LOG_DIR="${BUILD_LOG_DIR:-${REPO_ROOT}/.fraud-detection/build-logs}"
LOCK_FILE="${IMAGES_LOCK_FILE:-${REPO_ROOT}/pipeline/images.lock.json}"

usage() {
    sed -n "2,20p" "$0" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case "$1" in
        --tag) TAG="${2:?--tag needs a value}"; shift ;;
        --push) PUSH=true; REGISTRY="${2:?--push needs a registry, e.g. quay.io/me}"; shift ;;
        --registry) REGISTRY="${2:?--registry needs a value}"; shift ;;
        --kind) KIND_CLUSTER="${2:?--kind needs a cluster name}"; shift ;;
        --only) ONLY+=("${2:?--only needs a step name}"); shift ;;
        --skip-s3a-jars) S3A_JARS=skip ;;
        --verbose|-v) VERBOSE=true ;;
        --no-cache) NO_CACHE=(--no-cache) ;;
        -h|--help) usage; exit 0 ;;
        *) echo "build_images.sh: unknown option '$1'" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

# A client alone is not enough: the engine must answer (docker needs its daemon).
ENGINE=""
for candidate in podman docker; do
    if command -v "${candidate}" >/dev/null 2>&1 && "${candidate}" info >/dev/null 2>&1; then
        ENGINE="${candidate}"
        break
    fi
done
if [ -z "${ENGINE}" ]; then
    echo "build_images.sh: neither podman nor docker is usable here (installed and answering 'info'); see docs/cluster.md" >&2
    exit 1
fi

# "<step> <folder>" pairs from pipeline/images.py STEPS.
mapfile -t STEPS < <(python3 -c 'import sys; sys.path.insert(0, "."); from pipeline.images import STEPS; [print(s, f) for s, f in STEPS.items()]')

selected() {
    local step="$1" wanted
    [ ${#ONLY[@]} -eq 0 ] && return 0
    for wanted in "${ONLY[@]}"; do
        [ "${wanted}" = "${step}" ] && return 0
    done
    return 1
}
known_step() {
    local entry
    for entry in "${STEPS[@]}"; do
        [ "${entry%% *}" = "$1" ] && return 0
    done
    return 1
}
for wanted in "${ONLY[@]}"; do
    known_step "${wanted}" || { echo "build_images.sh: no step named '${wanted}' (see pipeline/images.py STEPS)" >&2; exit 2; }
done

CODE_VERSION="$(git describe --always --dirty --tags 2>/dev/null || echo unknown)"
# The step Containerfiles name the shared base by these fixed local names.
BUILDER="localhost/fraud-detection/builder:current"
RUNTIME="localhost/fraud-detection/runtime:current"
mkdir -p "${LOG_DIR}"

human_size() {  # bytes -> "1.23 GB" / "456 MB"
    awk -v b="$1" 'BEGIN { if (b >= 1e9) printf "%.2f GB", b / 1e9; else printf "%.0f MB", b / 1e6 }'
}

# build LOG ARGS...: one engine build, output to LOG (or the terminal with --verbose too).
build() {
    local log="$1"
    shift
    if [ "${VERBOSE}" = true ]; then
        "${ENGINE}" build "${NO_CACHE[@]}" "$@" 2>&1 | tee "${log}"
        return "${PIPESTATUS[0]}"
    fi
    "${ENGINE}" build "${NO_CACHE[@]}" "$@" >"${log}" 2>&1
}

failed=()
built=()
results=()   # "step ref seconds" for the lock file
report() {  # report STATUS NAME SECONDS DETAIL
    printf '%-5s %-20s %5ss  %s\n' "$1" "$2" "$3" "$4"
}
reason() {  # the build's own last words, not the engine's echo of the whole failed instruction
    grep -v '^Error: building at STEP' "$1" | tail -n 1 | cut -c1-200
}

for target in builder runtime; do
    ref="${BUILDER}"; [ "${target}" = runtime ] && ref="${RUNTIME}"
    log="${LOG_DIR}/base-${target}.log"
    started=${SECONDS}
    if build "${log}" --file containers/Containerfile.base --target "${target}" --tag "${ref}" .; then
        report ok "base-${target}" "$((SECONDS - started))" "${ref}"
    else
        report FAIL "base-${target}" "$((SECONDS - started))" "$(reason "${log}") (log: ${log})"
        echo "build_images.sh: the shared base did not build; no step image can" >&2
        exit 1
    fi
done

# The steps mount the builder while they install; the engines do not key their layer cache on
# a mounted image, so its ID goes in as a build argument: a new builder means a fresh install.
BUILDER_ID="$("${ENGINE}" image inspect --format '{{.Id}}' "${BUILDER}")"

for entry in "${STEPS[@]}"; do
    read -r step folder <<< "${entry}"
    selected "${step}" || continue
    ref="${REGISTRY}/${step}:${TAG}"
    log="${LOG_DIR}/${step}.log"
    args=(--file "${folder}/Containerfile" --tag "${ref}" --build-arg "BUILDER_ID=${BUILDER_ID}")
    [ "${step}" = data-preparation ] && args+=(--build-arg "S3A_JARS=${S3A_JARS}")
    stamp=(--file containers/Containerfile.stamp --tag "${ref}"
           --build-arg "IMAGE=${ref}" --build-arg "CODE_VERSION=${CODE_VERSION}")
    started=${SECONDS}
    if [ ! -f "${folder}/Containerfile" ]; then
        report FAIL "${step}" 0 "${folder}/Containerfile is missing"
        failed+=("${step}")
    elif build "${log}" "${args[@]}" . && build "${log}.stamp" "${stamp[@]}" .; then
        took=$((SECONDS - started))
        size="$("${ENGINE}" image inspect --format '{{.Size}}' "${ref}")"
        report ok "${step}" "${took}" "$(human_size "${size}")  ${ref}"
        built+=("${ref}")
        results+=("${step} ${ref} ${took}")
    else
        report FAIL "${step}" "$((SECONDS - started))" "$(reason "${log}") (log: ${log})"
        failed+=("${step}")
    fi
done

if [ "${PUSH}" = true ]; then
    for ref in "${built[@]}"; do
        echo "push  ${ref}"
        if [ "${ENGINE}" = podman ]; then
            podman push --quiet --digestfile "${LOG_DIR}/$(basename "${ref%%:*}").digest" "${ref}"
        else
            docker push --quiet "${ref}" >/dev/null
        fi
    done
fi

# pipeline/images.lock.json: what was built, by immutable ID (and registry digest when pushed).
write_lock() {  # write_lock LINES: one "step<TAB>ref<TAB>id<TAB>digest<TAB>seconds" per line
    python3 -c '
import json, os, sys
from pathlib import Path

lock, code_version, s3a_jars, lines = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
entries = json.loads(lock.read_text()).get("images", {}) if lock.is_file() else {}
for line in lines.splitlines():
    step, ref, image_id, digest, seconds = line.split("\t")
    name = ref.rsplit(":", 1)[0]
    entries[step] = {
        "ref": ref,
        "id": image_id if image_id.startswith("sha256:") else f"sha256:{image_id}",
        # Only after --push: the registry manifest digest, what a cluster pulls.
        "digest": digest or None,
        "pinned": f"{name}@{digest}" if digest else None,
        "code_version": code_version,
        "build_seconds": int(seconds),
        **({"s3a_jars": s3a_jars} if step == "data-preparation" else {}),
    }
tmp = lock.with_suffix(".tmp")
tmp.write_text(json.dumps({"images": dict(sorted(entries.items()))}, indent=2) + "\n")
os.replace(tmp, lock)
' "${LOCK_FILE}" "${CODE_VERSION}" "${S3A_JARS}" "$1"
}

if [ ${#results[@]} -gt 0 ]; then
    lines=""
    for result in "${results[@]}"; do
        read -r step ref took <<< "${result}"
        id="$("${ENGINE}" image inspect --format '{{.Id}}' "${ref}")"
        id="sha256:${id#sha256:}"
        if ! [[ "${id}" =~ ^sha256:[0-9a-f]{64}$ ]]; then
            echo "build_images.sh: ${ref}: the engine gave no image ID; not recorded in the lock file" >&2
            continue
        fi
        digest=""
        if [ "${PUSH}" = true ]; then
            if [ "${ENGINE}" = podman ]; then
                digest="$(cat "${LOG_DIR}/$(basename "${ref%%:*}").digest")"
            else
                digest="$(docker image inspect --format '{{index .RepoDigests 0}}' "${ref}")"
                digest="${digest##*@}"
            fi
        fi
        lines+="$(printf '%s\t%s\t%s\t%s\t%s' "${step}" "${ref}" "${id}" "${digest}" "${took}")"$'\n'
    done
    write_lock "${lines}"
    echo "wrote ${LOCK_FILE#"${REPO_ROOT}"/}"
fi

if [ -n "${KIND_CLUSTER}" ] && [ ${#built[@]} -gt 0 ]; then
    command -v kind >/dev/null 2>&1 || { echo "build_images.sh: --kind needs 'kind' on PATH" >&2; exit 1; }
    for ref in "${built[@]}"; do
        echo "kind  load ${ref} into ${KIND_CLUSTER}"
        if [ "${ENGINE}" = podman ]; then
            # kind loads from docker by default; podman images go through an archive.
            archive="$(mktemp --suffix=.tar)"
            podman save --quiet --output "${archive}" "${ref}"
            kind load image-archive "${archive}" --name "${KIND_CLUSTER}" >/dev/null
            rm -f "${archive}"
        else
            kind load docker-image "${ref}" --name "${KIND_CLUSTER}" >/dev/null
        fi
    done
fi

if [ ${#failed[@]} -gt 0 ]; then
    echo "build_images.sh: ${#failed[@]} image(s) failed: ${failed[*]} (logs in ${LOG_DIR})" >&2
    exit 1
fi
echo "built ${#built[@]} image(s) with ${ENGINE}; code version ${CODE_VERSION}; logs in ${LOG_DIR}"
