"""scripts/bench_transfer.py runs on the CPU (tiny sizes) and writes every kind of row; timings are not checked."""
import json

from tests.helpers import load_script


def test_bench_transfer_writes_every_row(tmp_path):
    out = tmp_path / "rows.jsonl"
    assert load_script("bench_transfer").main(["--sizes_mb", "1", "--total_mb", "4", "--threads", "1,2",
                                               "--repeats", "1", "--no_first_copy", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    kinds = {(r["kind"], r.get("memory"), r.get("threads")) for r in rows}
    for t in (1, 2):
        for kind, memory in (("put", "pageable"), ("put", "staging arena"), ("read_put", "fresh pageable"),
                             ("read_put", "staging arena")):
            assert (kind, memory, t) in kinds
    assert ("read", "fresh", None) in kinds and rows[-1] == {**rows[-1], "kind": "staging", "pinned": False}
    assert all(r["gb_s"] > 0 for r in rows if "gb_s" in r)
