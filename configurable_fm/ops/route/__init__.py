"""Routing over a library of adapters: per-token mixtures (Arrow), searched combinations (LoraHub) and retrieval by
task embeddings, all as pure functions from a base model and LoRA adapters to new models or arrays.

    m = arrow(base, [lora_1, lora_2, lora_3], top_k=2)                    # per token and module (arrow.py)
    hub = lorahub(base, [lora_1, lora_2, lora_3], few_shot_batch(tok, xs, ys), budget=40, seed=0)
    hub.weights, hub.model                                               # (lorahub.py, search.py: CMA-ES)
    encoder = load_text_encoder()                                        # all-MiniLM-L6-v2 (embed.py)
    router = build_router(encoder, {"code": [...], "prose": [...]})      # centroids (retrieval.py)
    routing = route_texts(router, encoder, queries)                      # scores, top-1 choices, top-k weights
    logits = run_routed(bricks.adapters.mix(base, [code, prose]), routing, ids_BxT)
    logits = run_folded(weighted_mix(base, [code, prose]), routing, ids_BxT)  # each routing merged into W once
    lib = AdapterLibrary.from_models({"code": code, "prose": prose}, examples=...); lib.save("out/lib")

common.py     RouteError; the checks every routing operation makes on its adapters (LoRA, same modules)
mixture.py    Σ_i w_i s_i (x A_i) B_i with stacked factors (lora_mixture); RowWeightedLinear, weighted_mix,
              with_adapter_weights (one weight vector per batch row); unroute; folded (a routing merged into the
              weights: W + Σ_i w_i ΔW_i, the base's structure); softmax_top_k
arrow.py      Arrow (+ GenKnowSub): prototypes (top singular vectors), per-token top-k routing, ArrowLinear
search.py     cma_es: a seeded CMA-ES in numpy with box bounds and an evaluation budget
lorahub.py    LoraHub: A' = Σ w A, B' = Σ w B; few-shot cross-entropy + L1; the search
embed.py      sentence embeddings as sentence-transformers computes them (BERT, mean pooling, L2 normalise)
retrieval.py  centroid routing (top-1 / softmax top-k, floors, base or uniform fallback), the routed batch
              (run_routed: unmerged; run_folded: rows grouped by routing, each group on its folded model), the
              routing cost
library.py    AdapterLibrary: names, adapter brick sets, example inputs; save / load a directory
"""
from configurable_fm.ops.route.common import RouteError
from configurable_fm.ops.route.mixture import (AdapterWeights, FoldedModels, RowWeightedLinear, StackedLoRALinear,
                                               folded, lora_mixture, routed_modules, softmax_top_k, unroute,
                                               weighted_mix, with_adapter_weights)
from configurable_fm.ops.route.arrow import (ArrowLinear, Prototypes, arrow, arrow_modules, arrow_weights,
                                             lora_prototypes)
from configurable_fm.ops.route.search import SearchResult, cma_es
from configurable_fm.ops.route.lorahub import (FewShot, LoraHubResult, few_shot_batch, lorahub, lorahub_combine,
                                               lorahub_objective, target_loss)
from configurable_fm.ops.route.embed import TextEncoder, embed_texts, load_text_encoder, tokenize
from configurable_fm.ops.route.retrieval import (UNIFORM_ID, CentroidRouter, Routing, RoutingCost, build_router,
                                                 calibrated_floor, centroid, forward_call, median_seconds, route,
                                                 route_texts, routed_model, routing_cost, run_folded, run_routed)
from configurable_fm.ops.route.library import AdapterLibrary

__all__ = ["RouteError", "AdapterWeights", "FoldedModels", "RowWeightedLinear", "StackedLoRALinear", "folded",
           "lora_mixture", "routed_modules", "softmax_top_k", "unroute", "weighted_mix", "with_adapter_weights",
           "ArrowLinear", "Prototypes", "arrow", "arrow_modules", "arrow_weights", "lora_prototypes",
           "SearchResult", "cma_es",
           "FewShot", "LoraHubResult", "few_shot_batch", "lorahub", "lorahub_combine", "lorahub_objective",
           "target_loss",
           "TextEncoder", "embed_texts", "load_text_encoder", "tokenize",
           "UNIFORM_ID", "CentroidRouter", "Routing", "RoutingCost", "build_router", "calibrated_floor", "centroid",
           "forward_call", "median_seconds", "route", "route_texts", "routed_model", "routing_cost", "run_folded",
           "run_routed", "AdapterLibrary"]
