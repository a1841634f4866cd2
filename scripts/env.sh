# Sourced by the scripts (and by hand before cargo): points the tch build at libtorch.
# A user's own libtorch wins: set LIBTORCH (and optionally ARCANA_VENV for the Python reference side).
ARCANA_VENV="${ARCANA_VENV:-$HOME/.cache/arcana/venv-torch-2.0.1}"
export ARCANA_VENV
export PATH="$ARCANA_VENV/bin:$PATH"
if [ -z "${LIBTORCH:-}" ]; then
  export LIBTORCH_USE_PYTORCH=1
fi
export LIBTORCH_BYPASS_VERSION_CHECK=1
