"""scripts/bench_sparse_decode.py runs end to end at a tiny shape on the CPU (the Pallas kernels interpreted): one row
per option set, the dispatching rows checked against the masked forward, and bad options are one-line errors. Its
main(argv) runs in the test's process (the command line's path without a second interpreter's imports)."""
import json

from tests.helpers import run_script


def test_bench_sparse_decode_tiny(tmp_path, capsys):
    out = tmp_path / "sd.jsonl"
    code, _ = run_script("bench_sparse_decode", [
        "--shape", "tiny", "--new_tokens", "3", "--repeats", "1", "--top_k", "1", "--modes", "pallas",
        "--pallas", "decode=0;matvec=1,token_width=16", "--profile", str(tmp_path / "prof"), "--out", str(out)], capsys)
    assert code is None
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["row"] for r in rows] == ["dense", "moefied+pallas[decode=0]", "moefied+pallas[matvec=1,token_width=16]"]
    for r in rows[1:]:  # bf16 weights: the paths differ by rounding only
        assert r["top_k"] == 1 and r["ffn_read"] == 1 / 16 and r["ffn_rel_err"] < 2e-2
    assert all("profile" in r for r in rows)  # on the CPU: 'no device kernels ...'; on a GPU the kernel summary


def test_bench_sparse_decode_bad_option(capsys):
    code, captured = run_script("bench_sparse_decode", ["--pallas", "matvec=1;decode=2"], capsys)
    message = "'decode=2': expected name=int (0/1 for decode,matvec,route"
    assert code == 2 and message in captured.err and "Traceback" not in captured.err, captured.err
