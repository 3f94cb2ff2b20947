# After recovery_sparse_train.sh on the same warm machine: the recovered models' thresholds re-calibrated to 75%
# (training moves the activations), then the dense, before (ffn25) and after models evaluated on the trainer's
# validation batches (moefy_recover.py:eval, the same batches as the runs' val_ppl).
source benchmarks/pending_gpu/env.sh
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.22  # four processes at once
S="scripts/sparsify.py --config experiments/analysis/sparsify.py:quarter,code --config.calibration.tokenizer=/tmp/smol.gguf --config.evaluation.n_tokens=65536 --config.overwrite=True"
E="scripts/train.py --config experiments/analysis/moefy_recover.py:eval,code --config.progress=False $EXTRA"
RUNS=${RUNS:-sk st}  # the recovery runs to evaluate (recovery_sparse_train.sh's sl, sk or st; at most two)
for r in $RUNS; do (timeout 150 python3 $S --config.input=/tmp/rec/$r/best --config.output=/tmp/sparse/recal_$r > $OUT/resparsify_$r.log 2>&1; el resparsify_$r $?) & done
wait; cut -c1-400 $OUT/resparsify_*.log
for m in /tmp/smol.gguf:dense /tmp/sparse/ffn25:before $(for r in $RUNS; do echo /tmp/sparse/recal_$r:after_$r; done); do (timeout 150 python3 $E --workdir /tmp/rec/${m#*:} --config.init_from=${m%:*} > $OUT/${m#*:}.log 2>&1; el ${m#*:} $?) & done
wait
for f in dense before $(for r in $RUNS; do echo after_$r; done); do echo $f; grep -o '"val_ppl": [0-9.]*' /tmp/rec/$f/metrics.jsonl | tail -1; tail -1 $OUT/$f.log | cut -c1-300; done
# the trained adapters (brick sets, ~15 MB each) come back for a CPU evaluation on more domains (English too)
for r in $RUNS; do tar czf $OUT/adapter_$r.tgz -C /tmp/rec/$r adapter; done; ls -la $OUT
