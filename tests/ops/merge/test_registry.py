"""Every merge method the merging issue lists is registered, with mergekit 0.1.5's base usage."""
import pytest

from configurable_fm.ops.merge.registry import get_method

ISSUE_METHODS = {  # name -> base usage in mergekit 0.1.5
    "linear": "ignored", "task_arithmetic": "required", "ties": "required", "dare_linear": "required",
    "dare_ties": "required", "breadcrumbs": "required", "breadcrumbs_ties": "required", "della": "required",
    "della_linear": "required", "slerp": "required", "nuslerp": "optional", "multislerp": "optional",
    "karcher": "ignored", "model_stock": "required", "sce": "required", "nearswap": "required",
    "arcee_fusion": "required", "ram": "required", "ramplus_tl": "required", "passthrough": "ignored",
}


@pytest.mark.parametrize("name", sorted(ISSUE_METHODS))
def test_registered_with_mergekit_base_usage(name):
    assert get_method(name).base == ISSUE_METHODS[name]


def test_unknown_method_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown merge method 'tie'; known: \[.*'ties'"):
        get_method("tie")
