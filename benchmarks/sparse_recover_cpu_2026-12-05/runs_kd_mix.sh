# After runs.sh (its /tmp/sr/ffn25): the distillation recovery of runs_kd.sh on mixed data instead of code alone:
# the stdlib and English that the held-out English evaluation never sees (WordNet glosses, the GCIDE dictionary and
# the CPython docs; no State of the Union text, which heldout_eval.py's English is), built with
#   python scripts/prepare_data.py --config experiments/data.py:mix \
#       --config.english.parts="('wordnet','gcide','python_docs')" --out /tmp/cfmdata/mix_nosotu
# (22.6M training tokens, 39% of the characters code). STEPS steps of 4 x 256 tokens (default 200), TRACK=1 adds
# the 'track' option (the thresholds kept at 75% while training); then re-calibrated to 75% on the stdlib and
# evaluated as the other runs.
cd /work/main
STEPS=${STEPS:-200}; EVAL=${EVAL:-50}; DATA=${DATA:-/tmp/cfmdata/mix_nosotu}
V=lora_sparse,mix,kd; N=mix_kd$STEPS
[ "${TRACK:-0}" = 1 ] && { V=$V,track; N=${N}_track; }
COMMON="--config.compute_dtype=float32 --config.mesh.shape=(1,1,1) --config.batch_size=4 --config.seq_len=256 --config.data.eval_batch_size=8 --config.data.max_eval_batches=4 --config.progress=False"
R=/tmp/sr
run() { name=$1; cfg=$2; shift 2; t=$(date +%s); timeout 3600 .venv/bin/python scripts/train.py --config $cfg --workdir $R/runs/$name $COMMON "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s)-t ))s"; }
run $N experiments/analysis/moefy_recover.py:$V --config.init_from=$R/ffn25 --config.steps=$STEPS --config.eval_every=$EVAL --config.data.dir=$DATA
t=$(date +%s)
.venv/bin/python scripts/sparsify.py --config experiments/analysis/sparsify.py:quarter --config.input=$R/runs/$N/best --config.calibration.tokenizer=smollm2-135m-instruct --config.output=$R/recalibrated_$N --config.overwrite=True > $R/resparsify_$N.log 2>&1; echo "resparsify rc=$? $(( $(date +%s)-t ))s"
echo done
