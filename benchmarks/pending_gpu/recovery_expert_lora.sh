# GGUF from /tmp/ga.xz (c3) + .gpu/gb; code data; the lora_mlp control (dense, background) while MoEfying
# 16x(2 shared + top 2 of 14); then lora_experts; 3000 steps each; three processes share the GPU (0.3 of its memory
# each); LIMIT (default 570) is the seconds the training may take, counted from the start
source benchmarks/pending_gpu/env.sh
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.3
[ -d /tmp/cfmdata/code ] || timeout 120 python3 scripts/prepare_data.py --config experiments/data.py:code --config.tokenizer=/tmp/smol.gguf --config.code.packages="$CODE_PACKAGES" > $OUT/prep.log 2>&1; el prep $?; tail -2 $OUT/prep.log | cut -c1-300
R="--config.steps=3000 --config.eval_every=500 --config.checkpoint_every=3000 --config.progress=False"
(timeout $(( ${LIMIT:-570} - ($(date +%s)-t0) )) python3 scripts/train.py --config experiments/analysis/moefy_recover.py:lora_mlp,code $R --workdir /tmp/rec/lm --config.init_from=/tmp/smol.gguf > $OUT/lm.log 2>&1; el lora_mlp $?) &
timeout 240 python3 scripts/moefy.py --config experiments/analysis/moefy.py:cmoe --config.input=/tmp/smol.gguf --config.num_experts_per_tok=2 --config.calibration.corpus=code --config.output=/tmp/moefied/smol > $OUT/moefy.log 2>&1; el moefy $?
timeout $(( ${LIMIT:-570} - ($(date +%s)-t0) )) python3 scripts/train.py --config experiments/analysis/moefy_recover.py:lora_experts,code $R --workdir /tmp/rec/lx --config.init_from=/tmp/moefied/smol > $OUT/lx.log 2>&1; el lora_experts $?
wait
for f in lm lx; do cp /tmp/rec/$f/metrics.jsonl $OUT/$f.jsonl; echo $f; grep -E "val_ppl" $OUT/$f.jsonl | grep -o '"step": [0-9]*\|"val_ppl": [0-9.]*' | paste -sd' '; grep -o '"tokens_per_s": [0-9.]*' $OUT/$f.jsonl | tail -1; done
