# After runs.sh (its /tmp/sr/ffn25): the same recovery by distillation from the dense model (lora_sparse,stdlib,kd),
# 60 steps of 4 x 256 stdlib tokens, then re-calibrated to 75% and evaluated.
cd /work/main
COMMON="--config.compute_dtype=float32 --config.mesh.shape=(1,1,1) --config.batch_size=4 --config.seq_len=256 --config.data.eval_batch_size=8 --config.data.max_eval_batches=4 --config.progress=False"
R=/tmp/sr
run() { name=$1; cfg=$2; shift 2; t=$(date +%s); timeout 1500 .venv/bin/python scripts/train.py --config $cfg --workdir $R/runs/$name $COMMON "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s)-t ))s"; }
run sparse_kd experiments/analysis/moefy_recover.py:lora_sparse,stdlib,kd --config.init_from=$R/ffn25 --config.steps=60 --config.eval_every=30
t=$(date +%s)
.venv/bin/python scripts/sparsify.py --config experiments/analysis/sparsify.py:quarter --config.input=$R/runs/sparse_kd/best --config.calibration.tokenizer=smollm2-135m-instruct --config.output=$R/recalibrated_kd --config.overwrite=True > $R/resparsify_kd.log 2>&1; echo "resparsify rc=$? $(( $(date +%s)-t ))s"
run after_kd experiments/analysis/moefy_recover.py:eval,stdlib --config.init_from=$R/recalibrated_kd
echo done
