#!/bin/sh
# step-venv [--without PKG,PKG...] PACKAGE[EXTRA]...
# Run inside a step's build with the builder image mounted (at /builder in the Containerfiles):
# installs into /opt/venv exactly the locked, hash-checked, non-dev dependencies of the named
# workspace packages (e.g. `train fraud-common[kubeflow]`). --without leaves out locked packages
# that no code path of the step imports (e.g. sqlalchemy's mypy plugin that feast pulls in).
# Then drops what nothing imports at run time (test suites, C headers) and strips the
# libraries' symbol tables. Prints one line, not uv's full listing.
set -eu
builder="$(cd "$(dirname "$0")/../../.." && pwd)"   # this script is <builder>/usr/local/bin/step-venv
uv="${builder}/usr/local/bin/uv"
without=""
if [ "${1:-}" = --without ]; then
    for package in $(echo "${2:?--without needs a comma-separated list}" | tr ',' ' '); do
        without="${without} --no-emit-package ${package}"
    done
    shift 2
fi
[ $# -gt 0 ] || { echo "step-venv: name at least one workspace package" >&2; exit 2; }
export UV_PYTHON=/usr/local/bin/python3.11 UV_LINK_MODE=copy UV_NO_PROGRESS=1
export UV_CACHE_DIR="${UV_CACHE_DIR:-/tmp/uv-cache}"
cd "${builder}/src"
"${uv}" venv --quiet --allow-existing /opt/venv
requirements=""
for spec in "$@"; do
    package=${spec%%\[*}
    extras=""
    if [ "${spec}" != "${package}" ]; then
        extras="--extra $(echo "${spec#*\[}" | tr -d ']' | sed 's/,/ --extra /g')"
    fi
    out="/tmp/requirements-${package}.txt"
    # shellcheck disable=SC2086  # extras and exclusions are separate words on purpose
    "${uv}" export --quiet --frozen --no-dev --no-emit-workspace --no-header --package "${package}" ${extras} ${without} -o "${out}"
    requirements="${requirements} -r ${out}"
done
# shellcheck disable=SC2086
"${uv}" pip install --quiet --python /opt/venv/bin/python --require-hashes --no-deps ${requirements}
rm -f /tmp/requirements-*.txt
site=/opt/venv/lib/python3.11/site-packages
find "${site}" -depth -type d \( -name tests -o -name __pycache__ \) -exec rm -rf {} +
rm -rf "${site}/tensorflow/include" "${site}/pyarrow/include" "${site}/pyarrow/src"
# Strip the symbol tables that wheels ship (TensorFlow ~220 MB, pyarrow ~34 MB, uvloop ...);
# dynamic symbols stay. Not what auditwheel repaired (vendored *.libs folders and the modules
# whose RPATH points there): patchelf moved their segments, and strip breaks them. The builder's
# binutils run on this image's glibc (the same Debian release) with their own libraries.
binutils_env="LD_LIBRARY_PATH=${builder}/usr/lib/x86_64-linux-gnu"
find "${site}" -type f -name '*.so*' -size +1M ! -path '*.libs/*' | while read -r lib; do
    if env "${binutils_env}" "${builder}/usr/bin/readelf" -d "${lib}" 2>/dev/null | grep -q 'R[UN]*PATH.*\.libs'; then
        continue
    fi
    env "${binutils_env}" "${builder}/usr/bin/strip" --strip-unneeded "${lib}"
done
echo "step-venv: $* -> $(du -sm /opt/venv | cut -f1) MB in /opt/venv"
