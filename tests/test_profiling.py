"""configurable_fm.profiling: kernel categories and the per-name / per-category totals of trace events."""
import numpy as np
import pytest

from configurable_fm import profiling


def test_categories_of_typical_gpu_kernel_names():
    assert profiling.category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64") == "matmul"
    assert profiling.category("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNN") == "matmul"
    assert profiling.category("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16") == "attention"
    assert profiling.category("input_reduce_fusion_12") == "reduction fusion"
    assert profiling.category("loop_multiply_fusion_3") == "loop fusion"
    assert profiling.category("Memcpy DtoD (Device -> Device)") == "copy"
    assert profiling.category("ncclDevKernel_AllReduce_Sum_f32") == "collective"
    assert profiling.category("some_custom_kernel") == "other"


def test_summarize_totals_by_name_and_category_per_step():
    events = ([{"name": "gemm_a", "dur": 30.0}] * 4 + [{"name": "loop_add_fusion", "dur": 5.0}] * 8
              + [{"name": "input_reduce_fusion", "dur": 10.0}] * 2)
    s = profiling.summarize(events, steps=2, top=2)
    assert s["device_events"] == 14 and s["events_per_step"] == 7
    assert np.isclose(s["busy_ms"], 0.18) and np.isclose(s["busy_ms_per_step"], 0.09)
    assert [c["category"] for c in s["categories"]] == ["matmul", "loop fusion", "reduction fusion"]
    assert np.isclose(s["categories"][0]["ms_per_step"], 0.06) and np.isclose(s["categories"][0]["share"], 120 / 180)
    assert [t["name"] for t in s["top"]] == ["gemm_a", "loop_add_fusion"]  # top=2 of 3 names
    assert s["top"][0]["count"] == 4 and np.isclose(s["top"][0]["mean_us"], 30.0)
    assert profiling.summarize([], steps=1)["categories"] == []


def test_trace_without_a_gpu_says_so(tmp_path):
    import jax
    import jax.numpy as jnp

    if jax.default_backend() == "gpu":
        pytest.skip("a GPU writes device kernels into the trace")

    out = profiling.trace_kernels(lambda: jnp.ones(4).block_until_ready(), str(tmp_path))
    assert "profile" in out and out["wall_ms"] > 0
