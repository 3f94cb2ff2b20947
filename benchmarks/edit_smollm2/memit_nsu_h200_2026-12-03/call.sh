set -o pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=/tmp/jc
cat /tmp/gguf_a .ggb/part > /tmp/smol.gguf; echo "$(sha256sum /tmp/smol.gguf)"
B="--config experiments/edit/memit.py:smollm2 --config.input=/tmp/smol.gguf --config.subset=0:200:2 --config.format=orbax"
S1="--config.stats.corpus=$PWD/.gpe/english_110k.txt --config.stats.n_tokens=100000"
S10="--config.stats.corpus=$PWD/.gpe/english_1100k.txt --config.stats.n_tokens=1000000"
run() { name=$1; shift; t0=$(date +%s); timeout 150 python3 scripts/edit.py $B "$@" --config.output=/tmp/r_$name >> $OUT/log.txt 2>&1; rc=$?; cp /tmp/r_$name/metrics.json $OUT/${name}_metrics.json 2>/dev/null; python3 -c "
import json,sys; m=json.load(open('/tmp/r_$name/metrics.json')); s=m['after']['summary']; b=m.get('before',{}).get('summary',{}); print('$name rc=$rc $(( $(date +%s)-t0 ))s', {k: round(s[k]['mean'] if isinstance(s[k], dict) else s[k], 3) for k in ('efficacy_score','paraphrase_score','neighborhood_score','neighborhood_unedited_score') if k in s}, 'before', {k: round(b[k]['mean'], 3) for k in ('neighborhood_score','neighborhood_unedited_score') if k in b})" 2>&1 | tail -1; }
run l1400_s100k $S1 --config.hparams.mom2_update_weight=1400
run l2500_s100k $S1 --config.hparams.mom2_update_weight=2500
run l1400_w8_s1m $S10 --config.hparams.mom2_update_weight=1400 --config.layers="(2,3,4,5,6,7,8,9)"
run l2500_w8_s1m $S10 --config.hparams.mom2_update_weight=2500 --config.layers="(2,3,4,5,6,7,8,9)"
run l1000_s100k $S1 --config.hparams.mom2_update_weight=1000
