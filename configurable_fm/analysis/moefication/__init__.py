"""MoEfication: emergent bricks carved out of a dense model's FFNs (Zhang et al. 2022; CMoE, Pei et al. 2025).

    from configurable_fm.analysis.moefication import moefy, to_mixtral, layer_metrics
    moe = moefy(model, num_experts=16, num_experts_per_tok=4, split="kmeans", router="centroid", key=0)
    moe = moefy(model, num_experts=16, num_experts_per_tok=4, split="cmoe", router="mlp", calibration=batches, key=0)
    print(format_metrics(layer_metrics(model, moe, batches)))     # per-layer error and router recall
    to_hf(to_mixtral(moe_all_active), "out")                      # MixtralForCausalLM (exact with all experts on)
    fast = with_dispatch(moe, "pallas")                           # computes only the chosen experts (inference)

Modules: splits.py (how the neurons are grouped: kmeans, coactivation, cmoe, random) on clustering.py (balanced
assignment, k-means, graph partition); calibration.py (co-activation counts and router data through reduce_over,
calibration batches from a text corpus); module.py (the MoefiedMLP extension module and the oracle, centroid and
mlp routers); routers.py (centroid kernels, MLP router training with optax); transform.py (moefy, demoefy, splits_of);
export.py (to_mixtral); metrics.py (layer_metrics); dispatch.py (with_dispatch: forwards that compute only the
chosen experts, gathered in XLA or with Pallas kernels). Importing this package registers the extension kind
'moefied_mlp', so orbax checkpoints of MoEfied models load after `import configurable_fm.analysis.moefication`.
"""
from configurable_fm.analysis.moefication.calibration import (ExpertMass, TopCoActivation, coactivation_counts,
                                                              corpus_batches, router_data)
from configurable_fm.analysis.moefication.dispatch import MODES as DISPATCH_MODES, PallasOptions, with_dispatch
from configurable_fm.analysis.moefication.export import check_mixtral, mixtral_plan, to_mixtral
from configurable_fm.analysis.moefication.metrics import LayerMetrics, format_metrics, layer_metrics
from configurable_fm.analysis.moefication.module import (KIND, ROUTERS, CentroidRouter, MLPRouter, MoefiedMLP,
                                                         NeuronIndex, OracleRouter, dense_layout)
from configurable_fm.analysis.moefication.transform import (MoefyError, check_options, demoefy, ffn_layers,
                                                            moefied_layers, moefy, splits_of)
from configurable_fm.analysis.moefication.routers import RouterTraining, routing_recall, train_mlp_router
from configurable_fm.analysis.moefication.splits import (NEEDS_DATA, SPLITS, Split, cmoe_split, coactivation_split,
                                                         kmeans_split, random_split)

__all__ = ["moefy", "demoefy", "splits_of", "moefied_layers", "ffn_layers", "check_options", "MoefyError",
           "to_mixtral", "check_mixtral", "mixtral_plan", "layer_metrics", "format_metrics", "LayerMetrics",
           "MoefiedMLP", "dense_layout", "OracleRouter", "CentroidRouter", "MLPRouter", "NeuronIndex", "KIND",
           "ROUTERS", "RouterTraining", "train_mlp_router", "routing_recall", "Split", "SPLITS", "NEEDS_DATA",
           "kmeans_split", "coactivation_split", "cmoe_split", "random_split", "coactivation_counts", "router_data",
           "corpus_batches", "TopCoActivation", "ExpertMass", "with_dispatch", "PallasOptions", "DISPATCH_MODES"]
