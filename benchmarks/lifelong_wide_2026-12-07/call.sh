# Issue 10's sequential editing on a wider testbed (size `full_wide`: the `full` world, FFN 6,144 instead of
# 1,536), one GPU, any card. Run it again on the same warm machine while it ends with rc=75 (stopped at the time
# limit, state kept in /tmp/lw); each call brings back the log, results, report, plot, trace and cross-talk.
# EDITORS / N / TL override the editors, the edits per editor and the time limit; EXTRA adds arguments (e.g.
# EDITORS=alphaedit@l2 EXTRA="--set alphaedit@l2.l2_rel=0.05": AlphaEdit fitting the edited keys more closely).
source benchmarks/pending_gpu/env.sh
D=/tmp/lw
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
E=${EDITORS:-rls,alphaedit}
LAYERS=$(echo $E | tr ',' '\n' | sed 's/@.*//' | sort -u | sed 's/$/.layers=0/; s/^/--set /' | tr '\n' ' ')  # layer 0 each
python3 -m experiments.edit.lifelong --out $D --size full_wide --editors $E $LAYERS \
  --n_edits ${N:-1000} --time_limit ${TL:-400} $EXTRA > $OUT/lifelong.log 2>&1
rc=$?; echo "lifelong rc=$rc"
grep -v Warning $OUT/lifelong.log | tail -25 | cut -c1-220
[ -d $D/model ] && timeout ${XT:-240} python3 -m experiments.edit.crosstalk --study $D --layers 0,1,2 --edits 100,1000,10000 \
  > $OUT/crosstalk.txt 2>&1; tail -8 $OUT/crosstalk.txt | cut -c1-200
for f in results.json report.md lifelong.png trace.json stream.jsonl; do [ -f $D/$f ] && cp $D/$f $OUT/; done
exit 0
