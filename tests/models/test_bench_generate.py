"""scripts/bench_generate.py runs end to end at a tiny shape on the CPU and reports what BENCHMARKS.md quotes."""
import json
import sys
from pathlib import Path

from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[2]


def test_bench_generate_tiny(tmp_path, monkeypatch, capsys):
    """Sampling rows only (2 programs a row): greedy decoding runs in the --profile row."""
    import configurable_fm.models.attention as attn
    monkeypatch.setattr(attn, "dot_product_attention", attn.dot_product_attention)  # --attention replaces it
    out = tmp_path / "gen.jsonl"
    monkeypatch.setattr(sys, "argv", ["bench_generate.py", "--shape", "tiny", "--batch", "2", "--prompt", "8", "--new",
                                      "4", "--repeats", "1", "--attention", "xla", "--profile", str(tmp_path / "prof"),
                                      "--sampling", "sample", "--stream", "0,2", "--out", str(out)])
    load_script("bench_generate").main()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert capsys.readouterr().out.splitlines() == [json.dumps(row) for row in rows]
    bench, streamed, prof = rows
    assert bench["shape"] == "tiny" and bench["batch"] == 2 and bench["attention"] == "xla"
    assert bench["sampling"] == streamed["sampling"] == "sample"
    assert bench["stream"] == 0 and streamed["stream"] == 2 and streamed["tokens_per_s"] > 0
    # At this size the step time is a difference of two noisy timings (it can come out negative): not checked.
    assert bench["bound_ms"] > 0 and bench["tokens_per_s"] > 0 and bench["call_s"] > 0
    assert abs(bench["x_bound"] - bench["step_ms"] / bench["bound_ms"]) < 1e-9
    if prof.get("profile", "").startswith("no device kernels"):  # the CPU: the trace holds no GPU process
        assert prof["wall_ms"] > 0 and prof["new_tokens"] == 4
    else:
        assert prof["events_per_step"] > 0 and prof["top"] and prof["categories"]


def test_bench_sampling_small_vocab(tmp_path):
    """scripts/bench_sampling.py: every setting, and the top-k one at each --groups size (0: one top_k),
    against its whole-row sort (same draws, checked by the script)."""
    out = tmp_path / "s.jsonl"
    assert load_script("bench_sampling").main(["--vocab", "300", "--batch", "3", "--rounds", "1", "--calls", "1",
                                          "--groups", "0,4", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["batch"] for r in rows] == [3] * 9
    by_case = {r["case"]: r for r in rows}
    assert by_case["top_k 50, top_p 0.95"]["group"] == 0  # the CPU's default: one lax.top_k
    assert by_case["top_k 50, top_p 0.95, group 4"]["group"] == 4  # 75 groups > 64: through the maxima
    assert by_case["greedy"]["candidates"] == 0 and by_case["temperature 0.8"]["candidates"] == 0
    assert by_case["top_k 50, top_p 0.95"]["candidates"] == 64
    assert by_case["top_p 0.95, whole row sorted"]["candidates"] == by_case["top_p 0.95"]["candidates"]
    assert all(r["ms_median"] > 0 for r in rows)


def test_one_token_items():
    bench = load_script("bench_generate")
    from configurable_fm.models.one_token import OneTokenMatmuls
    assert bench.one_token_option("0") is False and bench.one_token_option("1") is True
    options = bench.one_token_option("min_elements=4096/out=32")
    assert options == OneTokenMatmuls(min_elements=4096, out=32)
    assert bench.option_record(options) == {"min_elements": 4096, "out": 32} and bench.option_record(True) is True
    for bad in ("2", "size=3", "out=x", "interpret=1"):
        try:
            bench.one_token_option(bad)
        except ValueError as e:
            assert "FIELD=INTEGER" in str(e)
        else:
            raise AssertionError(bad)
