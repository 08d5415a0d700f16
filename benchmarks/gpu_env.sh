# Sourced by gpu_checks.sh and gpu_reduced_run.sh, from the repository root: the package from this source tree,
# and the wheels the GPU machine lacks (kornia, kornia_rs, pyhessian; docs/benchmarks.md, "On a lent GPU")
# installed from $WHEELS (default .whl, skipped when it holds none) into /tmp/site.
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
