# After runs.sh (its /tmp/sr/ffn25): runs_kd.sh with 200 steps (205k tokens) instead of 60.
# then re-calibrated to 75% and evaluated.
cd /work/main
COMMON="--config.compute_dtype=float32 --config.mesh.shape=(1,1,1) --config.batch_size=4 --config.seq_len=256 --config.data.eval_batch_size=8 --config.data.max_eval_batches=4 --config.progress=False"
R=/tmp/sr
run() { name=$1; cfg=$2; shift 2; t=$(date +%s); timeout 3600 .venv/bin/python scripts/train.py --config $cfg --workdir $R/runs/$name $COMMON "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s)-t ))s"; }
run sparse_kd200 experiments/analysis/moefy_recover.py:lora_sparse,stdlib,kd --config.init_from=$R/ffn25 --config.steps=200 --config.eval_every=50
t=$(date +%s)
.venv/bin/python scripts/sparsify.py --config experiments/analysis/sparsify.py:quarter --config.input=$R/runs/sparse_kd200/best --config.calibration.tokenizer=smollm2-135m-instruct --config.output=$R/recalibrated_kd200 --config.overwrite=True > $R/resparsify_kd200.log 2>&1; echo "resparsify rc=$? $(( $(date +%s)-t ))s"
run after_kd200 experiments/analysis/moefy_recover.py:eval,stdlib --config.init_from=$R/recalibrated_kd200
echo done
