set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CFM_DATA_DIR=/tmp/cfmdata
cat /tmp/gguf_a .ggb/part > /tmp/smol.gguf; sha256sum /tmp/smol.gguf | cut -c1-16
t0=$(date +%s); el() { echo "$1 rc=$2 $(( $(date +%s)-t0 ))s"; }
timeout 120 python3 scripts/prepare_data.py --config experiments/data.py:code --config.tokenizer=/tmp/smol.gguf --config.code.packages="('numpy','jax','flax','optax','orbax','chex','transformers','torch')" > $OUT/prep.log 2>&1; el prep $?; tail -3 $OUT/prep.log
timeout 170 python3 scripts/moefy.py --config experiments/analysis/moefy.py:cmoe --config.input=/tmp/smol.gguf --config.num_experts_per_tok=2 --config.calibration.corpus=code --config.output=moefied/smollm2-cmoe-16x4 > $OUT/moefy.log 2>&1; el moefy $?; tail -8 $OUT/moefy.log

for m in dense before; do
  I=""; [ $m = dense ] && I="--config.init_from=/tmp/smol.gguf"
  timeout 90 python3 scripts/train.py --config experiments/analysis/moefy_recover.py:eval,code --workdir /tmp/rec/$m $I --config.progress=False > $OUT/$m.log 2>&1; el $m $?; cp /tmp/rec/$m/metrics.jsonl $OUT/$m.jsonl; tail -2 /tmp/rec/$m/metrics.jsonl
done
timeout $(( 585 - ($(date +%s)-t0) )) python3 scripts/train.py --config experiments/analysis/moefy_recover.py:both,code --workdir /tmp/rec/both --config.progress=False > $OUT/both.log 2>&1; el both $?; cp /tmp/rec/both/metrics.jsonl $OUT/both.jsonl; grep -E "tokens_per_s|val" /tmp/rec/both/metrics.jsonl | tail -4
