# Sourced by the scripts here, on the GPU machine from the repository root: the carried wheels installed into
# /tmp/site, PYTHONPATH and the data root set, SmolLM2's GGUF assembled at /tmp/smol.gguf when both halves are there
# (/tmp/ga.xz from the call before, .gpu/gb carried), and el NAME RC (a line with the seconds since this ran).
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD CFM_DATA_DIR=/tmp/cfmdata
# the site-packages the code datasets are built from (experiments/data.py:code, --config.code.packages)
CODE_PACKAGES="('numpy','jax','flax','optax','orbax','chex','transformers','torch')"
if [ ! -f /tmp/smol.gguf ] && [ -f /tmp/ga.xz ] && [ -f .gpu/gb/part.xz ]; then
  xz -dc /tmp/ga.xz > /tmp/smol.gguf.part && xz -dc .gpu/gb/part.xz >> /tmp/smol.gguf.part && mv /tmp/smol.gguf.part /tmp/smol.gguf
fi
[ -f /tmp/smol.gguf ] && sha256sum /tmp/smol.gguf | cut -c1-16
t0=$(date +%s); el() { echo "== $1 rc=$2 $(( $(date +%s)-t0 ))s"; }
