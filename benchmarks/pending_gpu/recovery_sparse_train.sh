# 25% of the FFN neurons active by TEAL thresholds (scripts/sparsify.py :quarter, calibrated on code), recovered for
# STEPS (default 2000) steps of 32 x 512 code tokens, up to three runs sharing the GPU (0.3 of its memory each):
#   dl  lora_sparse on the dense model (the control of sl: the same LoRA and data, no sparsity)
#   sl  lora_sparse,code     (next-token loss)
#   sk  lora_sparse,code,kd  (distilled from the dense model)
#   st  lora_sparse,code,kd,track  (distilled, the thresholds kept at 75% while training: train/sparsity_tracking.py)
# The GGUF: /tmp/smol.gguf from a call before on the same warm machine, else /tmp/ga.xz (left by the call before)
# + .gpu/gb (carried). recovery_sparse_eval.sh re-calibrates and evaluates on the same warm machine.
# MIX='NAME:K[:SEED[:TEXTS]] ...' adds distillation runs (as sk) on code + English: the first K files of each code
# package and the .txt files of the folders TEXTS ('+'-separated under /tmp, default sotu_cal: the State of the
# Union speeches of the activation-sparsity study's calibration pool; docs_cal: the same half of the CPython docs;
# both unpacked from .gpu/sotu/*.tar.xz by a call before; the held-out evaluations read the other halves), built as
# /tmp/cfmdata/codeK_TEXTS; their adapters come back as adapter_NAME.tgz (cpu_heldout.sh evaluates them here).
# RUNS (default 'dl sk st'; at most three, MIX names included) picks the runs; LIMIT (default 575) is the seconds
# they may take, counted from the start. EXTRA (more trainer flags) makes a CPU dry run possible (STEPS=2
# EXTRA='--config.batch_size=2 ...').
source benchmarks/pending_gpu/env.sh
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.3
[ -d /tmp/cfmdata/code ] || { timeout 120 python3 scripts/prepare_data.py --config experiments/data.py:code --config.tokenizer=/tmp/smol.gguf --config.code.packages="$CODE_PACKAGES" > $OUT/prep.log 2>&1; el prep $?; tail -2 $OUT/prep.log | cut -c1-300; }
STEPS=${STEPS:-2000}
T="--config.steps=$STEPS --config.eval_every=500 --config.checkpoint_every=$STEPS --config.progress=False $EXTRA"
S="scripts/sparsify.py --config experiments/analysis/sparsify.py:quarter,code --config.calibration.tokenizer=/tmp/smol.gguf --config.evaluation.n_tokens=65536 --config.overwrite=True"
RUNS=${RUNS:-dl sk st}
train() {  # NAME VARIANT INIT [more flags]: in the background when NAME is in RUNS
  case " $RUNS " in *" $1 "*) ;; *) return ;; esac
  (timeout $(( ${LIMIT:-575} - ($(date +%s)-t0) )) python3 scripts/train.py --config experiments/analysis/moefy_recover.py:$2 $T --workdir /tmp/rec/$1 --config.init_from=$3 "${@:4}" > $OUT/$1.log 2>&1; el $1 $?) &
}
train dl lora_sparse,code /tmp/smol.gguf
timeout 120 python3 $S --config.input=/tmp/smol.gguf --config.output=/tmp/sparse/ffn25 > $OUT/sparsify.log 2>&1; el sparsify $?; cut -c1-400 $OUT/sparsify.log
train sl lora_sparse,code /tmp/sparse/ffn25
train sk lora_sparse,code,kd /tmp/sparse/ffn25 --config.task.teacher=/tmp/smol.gguf
train st lora_sparse,code,kd,track /tmp/sparse/ffn25 --config.task.teacher=/tmp/smol.gguf
for m in $MIX; do  # NAME:K[:SEED[:TEXTS]]: SEED the trainer's data order and the adapter's initialisation
  IFS=: read -r n k seed texts <<< "$m"; texts=${texts:-sotu_cal}; e=/tmp/eng_${texts//+/_}; d=/tmp/cfmdata/code${k}_${texts//+/_}
  [ -d $e ] || { mkdir -p $e.part && for t in ${texts//+/ }; do cp -r /tmp/$t $e.part/; done && mv $e.part $e; }
  [ -d $d ] || { timeout 120 python3 scripts/prepare_data.py --config experiments/data.py:code --config.sources="('code','files')" --config.files.root=$e --config.code.max_files_per_package=$k --config.tokenizer=/tmp/smol.gguf --config.code.packages="$CODE_PACKAGES" --out $d > $OUT/prep_$n.log 2>&1; el prep_$n $?; tail -4 $OUT/prep_$n.log | cut -c1-300; }
  train $n lora_sparse,code,kd /tmp/sparse/ffn25 --config.task.teacher=/tmp/smol.gguf --config.data.dir=$d \
    --config.seed=${seed:-0} --config.adapter.seed=${seed:-0}
done
wait
for m in $MIX; do tar czf $OUT/adapter_${m%%:*}.tgz -C /tmp/rec/${m%%:*} adapter; done
for f in $RUNS; do cp /tmp/rec/$f/metrics.jsonl $OUT/$f.jsonl 2>/dev/null; echo $f; grep -E "val_ppl" $OUT/$f.jsonl | grep -o '"step": [0-9]*\|"val_ppl": [0-9.]*' | paste -sd' '; grep -o '"tokens_per_s": [0-9.]*' $OUT/$f.jsonl | tail -1; tail -1 $OUT/$f.log | cut -c1-300; done
