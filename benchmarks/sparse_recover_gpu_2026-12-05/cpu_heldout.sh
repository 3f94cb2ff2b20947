# The adapters that recovery_sparse_train.sh trained on the GPU (brought back by recovery_sparse_eval.sh as
# adapter_NAME.tgz: sl, sk, st, or a MIX run's name), evaluated here on the CPU on more held-out text than the GPU
# call had: the whole stdlib validation split and 16,384 tokens of English (heldout_eval.py of the CPU study). Each
# adapter is merged into the 25%-active model (its LoRA sits on attention and gate/up_proj, whose inputs are dense:
# merging is exact), the thresholds re-calibrated to 75% on the stdlib, then evaluated beside the dense model and the
# 25%-active one.
#   bash benchmarks/sparse_recover_gpu_2026-12-05/cpu_heldout.sh DIR_WITH_THE_TGZ_FILES
set -e
cd "$(dirname "$0")/../.."
IN=${1:?usage: cpu_heldout.sh DIR (the folder holding the adapter_NAME.tgz files)} R=/tmp/sgx
ls $IN/adapter_*.tgz > /dev/null 2>&1 || { echo "cpu_heldout.sh: no adapter_NAME.tgz in $IN" >&2; exit 1; }
mkdir -p $R
S="scripts/sparsify.py --config experiments/analysis/sparsify.py:quarter --config.calibration.tokenizer=smollm2-135m-instruct --config.overwrite=True"
[ -d $R/ffn25 ] || .venv/bin/python $S --config.input=smollm2-135m-instruct --config.output=$R/ffn25 | cut -c1-300
args="before=$R/ffn25"
for a in $IN/adapter_*.tgz; do
  r=$(basename $a .tgz); r=${r#adapter_}
  rm -rf $R/adapter_$r $R/merged_$r && mkdir -p $R/adapter_$r && tar xzf $IN/adapter_$r.tgz -C $R/adapter_$r
  .venv/bin/python scripts/adapters.py --config experiments/adapters/merge.py --config.base=$R/ffn25 --config.adapters=$R/adapter_$r/adapter --config.output=$R/merged_$r --config.format=orbax | tail -1
  .venv/bin/python $S --config.input=$R/merged_$r --config.output=$R/recal_$r | cut -c1-300
  args="$args $r=$R/recal_$r"
done
.venv/bin/python benchmarks/sparse_recover_cpu_2026-12-05/heldout_eval.py $args
