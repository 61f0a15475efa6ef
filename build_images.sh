#!/usr/bin/env bash
# Build every step image with one tag, using podman or docker (whichever is present).
#
#   ./build_images.sh                          build all images as <registry>/<step>:<tag>
#   ./build_images.sh --tag 0.2.0              another tag (default: pipeline/images.py TAG)
#   ./build_images.sh --push quay.io/me        build as quay.io/me/<step>:<tag> and push
#   ./build_images.sh --kind fraud-detection   load the images into that kind cluster
#   ./build_images.sh --only train             build one step (repeatable)
#
# Image names and the default registry/tag come from pipeline/images.py, the same place the
# pipeline takes them from. The build context is the repository root (Containerfiles copy
# uv.lock and fraud_common/). Images pushed to another registry: compile the pipeline against
# it (edit REGISTRY in pipeline/images.py) or pass spark_image/predictor_image at run time.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "${REPO_ROOT}"

read_defaults() {
    # `python -m pipeline.images defaults` prints "<registry> <tag>"; no uv needed for this.
    python3 -c 'import sys; sys.path.insert(0, "."); from pipeline.images import REGISTRY, TAG; print(REGISTRY, TAG)'
}

read -r REGISTRY TAG < <(read_defaults)
PUSH=false
KIND_CLUSTER=""
ONLY=()

usage() {
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case "$1" in
        --tag) TAG="${2:?--tag needs a value}"; shift ;;
        --push) PUSH=true; REGISTRY="${2:?--push needs a registry, e.g. quay.io/me}"; shift ;;
        --registry) REGISTRY="${2:?--registry needs a value}"; shift ;;
        --kind) KIND_CLUSTER="${2:?--kind needs a cluster name}"; shift ;;
        --only) ONLY+=("${2:?--only needs a step name}"); shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "build_images.sh: unknown option '$1'" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

if command -v podman >/dev/null 2>&1; then
    ENGINE=podman
elif command -v docker >/dev/null 2>&1; then
    ENGINE=docker
else
    echo "build_images.sh: neither podman nor docker is on PATH" >&2
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

built=()
for entry in "${STEPS[@]}"; do
    read -r step folder <<< "${entry}"
    selected "${step}" || continue
    [ -f "${folder}/Containerfile" ] || { echo "build_images.sh: ${folder}/Containerfile is missing" >&2; exit 1; }
    ref="${REGISTRY}/${step}:${TAG}"
    echo "==> ${ENGINE} build ${ref} (${folder}/Containerfile)"
    "${ENGINE}" build --file "${folder}/Containerfile" --tag "${ref}" .
    built+=("${ref}")
done

[ ${#built[@]} -gt 0 ] || { echo "build_images.sh: no step matched --only ${ONLY[*]}" >&2; exit 2; }

if [ "${PUSH}" = true ]; then
    for ref in "${built[@]}"; do
        echo "==> push ${ref}"
        "${ENGINE}" push "${ref}"
    done
fi

if [ -n "${KIND_CLUSTER}" ]; then
    command -v kind >/dev/null 2>&1 || { echo "build_images.sh: --kind needs 'kind' on PATH" >&2; exit 1; }
    for ref in "${built[@]}"; do
        echo "==> kind load ${ref} into ${KIND_CLUSTER}"
        if [ "${ENGINE}" = podman ]; then
            # kind loads from docker by default; podman images go through an archive.
            archive="$(mktemp --suffix=.tar)"
            podman save --output "${archive}" "${ref}"
            kind load image-archive "${archive}" --name "${KIND_CLUSTER}"
            rm -f "${archive}"
        else
            kind load docker-image "${ref}" --name "${KIND_CLUSTER}"
        fi
    done
fi

echo "built: ${built[*]}"
