#!/bin/sh
# step-venv [--without PKG,PKG...] PACKAGE[EXTRA]...   (in the builder image, run from /src)
# Installs into /opt/venv exactly the locked, hash-checked, non-dev dependencies of the named
# workspace packages (e.g. `train fraud-common[kubeflow]`). --without leaves out locked packages
# that no code path of the step imports (e.g. sqlalchemy's mypy plugin that feast pulls in).
# Then drops what nothing imports at run time (test suites, C headers) and strips shared
# libraries' symbol tables. Prints one line, not uv's full listing.
set -eu
without=""
if [ "${1:-}" = --without ]; then
    for package in $(echo "${2:?--without needs a comma-separated list}" | tr ',' ' '); do
        without="${without} --no-emit-package ${package}"
    done
    shift 2
fi
[ $# -gt 0 ] || { echo "step-venv: name at least one workspace package" >&2; exit 2; }
uv venv --quiet /opt/venv
requirements=""
for spec in "$@"; do
    package=${spec%%\[*}
    extras=""
    if [ "${spec}" != "${package}" ]; then
        extras="--extra $(echo "${spec#*\[}" | tr -d ']' | sed 's/,/ --extra /g')"
    fi
    out="/tmp/requirements-${package}.txt"
    # shellcheck disable=SC2086  # extras and exclusions are separate words on purpose
    uv export --quiet --frozen --no-dev --no-emit-workspace --no-header --package "${package}" ${extras} ${without} -o "${out}"
    requirements="${requirements} -r ${out}"
done
# shellcheck disable=SC2086
uv pip install --quiet --python /opt/venv/bin/python --require-hashes --no-deps ${requirements}
site=/opt/venv/lib/python3.11/site-packages
find "${site}" -depth -type d \( -name tests -o -name __pycache__ \) -exec rm -rf {} +
rm -rf "${site}/tensorflow/include" "${site}/pyarrow/include" "${site}/pyarrow/src"
# Wheels such as TensorFlow ship unstripped libraries; their dynamic symbols stay.
find "${site}" -type f -name '*.so*' -size +1M -exec strip --strip-unneeded {} + 2>/dev/null || true
echo "step-venv: $* -> $(du -sm /opt/venv | cut -f1) MB in /opt/venv"
