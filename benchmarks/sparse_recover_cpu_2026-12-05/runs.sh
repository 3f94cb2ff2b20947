# 25% of SmolLM2-135M-Instruct's FFN neurons active by TEAL thresholds (down_proj inputs at 75%), then LoRA recovery
# (moefy_recover.py:lora_sparse) against the same LoRA on the dense model; CPU, 60 steps of 4 x 256 stdlib tokens.
cd /work/main
COMMON="--config.compute_dtype=float32 --config.mesh.shape=(1,1,1) --config.batch_size=4 --config.seq_len=256 --config.data.eval_batch_size=8 --config.data.max_eval_batches=4 --config.progress=False"
R=/tmp/sr
mkdir -p $R
run() { name=$1; cfg=$2; shift 2; t=$(date +%s); timeout 1200 .venv/bin/python scripts/train.py --config $cfg --workdir $R/runs/$name $COMMON "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s)-t ))s"; }
t=$(date +%s)
.venv/bin/python scripts/sparsify.py --config experiments/analysis/sparsify.py:quarter --config.input=smollm2-135m-instruct --config.output=$R/ffn25 --config.overwrite=True > $R/sparsify.log 2>&1; echo "sparsify rc=$? $(( $(date +%s)-t ))s"
run dense experiments/analysis/moefy_recover.py:eval,stdlib --config.init_from=smollm2-135m-instruct
run before experiments/analysis/moefy_recover.py:eval,stdlib --config.init_from=$R/ffn25
run sparse_lora experiments/analysis/moefy_recover.py:lora_sparse,stdlib --config.init_from=$R/ffn25 --config.steps=60 --config.eval_every=30
run dense_lora experiments/analysis/moefy_recover.py:lora_sparse,stdlib --config.init_from=smollm2-135m-instruct --config.steps=60 --config.eval_every=30
t=$(date +%s)
.venv/bin/python scripts/sparsify.py --config experiments/analysis/sparsify.py:quarter --config.input=$R/runs/sparse_lora/best --config.calibration.tokenizer=smollm2-135m-instruct --config.output=$R/recalibrated --config.overwrite=True > $R/resparsify.log 2>&1; echo "resparsify rc=$? $(( $(date +%s)-t ))s"
run after experiments/analysis/moefy_recover.py:eval,stdlib --config.init_from=$R/recalibrated
echo done
