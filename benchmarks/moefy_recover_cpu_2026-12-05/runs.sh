cd /work/main
COMMON="--config.compute_dtype=float32 --config.mesh.shape=(1,1,1) --config.batch_size=4 --config.seq_len=256 --config.data.eval_batch_size=8 --config.data.max_eval_batches=4 --config.progress=False"
run() { name=$1; cfg=$2; shift 2; t=$(date +%s); timeout 900 .venv/bin/python scripts/train.py --config $cfg --workdir /tmp/mr/runs/$name $COMMON "$@" > /tmp/mr/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s)-t ))s"; }
run dense experiments/analysis/moefy_recover.py:eval,stdlib --config.init_from=/tmp/mr/smol4
run before experiments/analysis/moefy_recover.py:eval,stdlib --config.init_from=/tmp/mr/smol4-cmoe-16x4
for m in both lora_experts; do run $m experiments/analysis/moefy_recover.py:$m,stdlib --config.init_from=/tmp/mr/smol4-cmoe-16x4 --config.steps=60 --config.eval_every=30; done
for m in lora lora_mlp; do run dense_$m experiments/analysis/moefy_recover.py:$m,stdlib --config.init_from=/tmp/mr/smol4 --config.steps=60 --config.eval_every=30; done
echo done
