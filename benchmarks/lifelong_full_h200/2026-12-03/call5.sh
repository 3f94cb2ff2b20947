set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
cp .gga/part /tmp/gguf_a
mkdir -p /tmp/lf && cp -n .gpu/trace_full.json /tmp/lf/trace.json
timeout 575 python3 -m experiments.edit.lifelong --out /tmp/lf --size full --editors alphaedit,rls@lam1,rls@lam0.25 --set alphaedit.layers=0 --set rls.layers=0 --set rls@lam1.lambda_rel=1 --set rls@lam0.25.lambda_rel=0.25 --n_edits 1000 --time_limit 345 > $OUT/lf_c4.log 2>&1; echo "lf rc=$?"
grep -v "^\s*$" $OUT/lf_c4.log | grep -i -E "knowledge|unedited model|edits|ES|stopped|done|error|Trace" | tail -40
cp /tmp/lf/results.jsonl $OUT/ 2>/dev/null; cp /tmp/lf/report.md $OUT/ 2>/dev/null; true
