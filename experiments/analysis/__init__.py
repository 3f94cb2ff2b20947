"""Analysis configs (ml-collections): moefy.py (MoEfication: a dense model's FFNs regrouped into routed experts).

    python scripts/moefy.py --config experiments/analysis/moefy.py --config.input=IN --config.output=OUT
"""
