"""Adapters as bricks: LoRA (+ rsLoRA), DoRA, (IA)³ on Linear modules, bottleneck (Houlsby / Pfeiffer) adapters after
sublayer outputs, and prompt / prefix tuning; PEFT-compatible both ways (bottleneck: no PEFT format).

    from configurable_fm.bricks import adapters
    m = adapters.attach(base, "lora", "layers.*.self_attn.[qv]_proj", rank=8, alpha=16, seed=0)
    adapters.adapter_state(m)            # {'layers.0.self_attn.q_proj.lora_a': ..., ...}: the adapter's own leaves
    merged = adapters.merge(m)           # plain Linears, W + s A B: what to_hf exports (to_hf refuses `m` itself)
    base = adapters.detach(m)            # the base back, the same arrays
    delta = adapters.as_delta(m)         # bricks.deltas.Delta (LowRank for LoRA)
    adapters.save_adapter(m, "out/lora"); m2 = adapters.load_adapter(base, "out/lora")
    m3 = adapters.from_peft(base, "peft_dir"); adapters.to_peft(m3, "out/peft")
    c = adapters.combine([m, m3], [0.7, 0.4], "cat")    # PEFT's add_weighted_adapter; combine_exact: Σ w ΔW, SVD
    vt = adapters.attach_virtual_tokens(base, "prompt", 20)   # prompt tuning ('prefix': prefix tuning)
    mixed = adapters.with_adapter_ids(adapters.mix(base, [m, m3]), [0, 1, -1])   # one adapter per batch row
    bn = adapters.attach_bottleneck(base, "houlsby", reduction_factor=16)   # bottleneck adapters (not mergeable)
    moe = adapters.attach_experts(moe_base, "layers.*.mlp.experts.*_proj", rank=8)   # a LoRA per expert (stacked
                                         # expert weights: PEFT's target_parameters; experts.py)

An adapted module replaces a `models.layers.Linear` at the same path, keeps `kernel` / `bias` there and adds its
parameters as leaves of that module (modules.py has the math and PEFT's conventions). Importing this package
registers the extension kinds 'lora', 'dora', 'ia3', 'bottleneck' and 'expert_lora' (models.structure), which orbax
checkpoints of adapted models and interop.peft need.
"""
from configurable_fm.bricks.adapters.core import (DEFAULT_ALPHA, DEFAULT_RANK, FEEDFORWARD, IA3_INITS, KINDS,
                                                  LORA_INITS, adapted_modules, adapter_state, adapters, as_delta,
                                                  attach, attach_experts, check_mergeable, detach, merge, path_key,
                                                  unmerge)
from configurable_fm.bricks.adapters.experts import ExpertLoRA, expert_loras
from configurable_fm.bricks.adapters.bottleneck import (INITS as BOTTLENECK_INITS, NON_LINEARITIES, BottleneckLinear,
                                                        BottleneckParam, attach_bottleneck, bottleneck_targets)
from configurable_fm.bricks.adapters.combine import (COMBINATIONS, CombineReport, check_options, combine,
                                                     combine_exact, peft_merge)
from configurable_fm.bricks.adapters.io import adapter_bricks, attach_bricks, load_adapter, save_adapter
from configurable_fm.bricks.adapters.modules import (ADAPTER_TYPES, AdaptedLinear, AdapterError, AdapterParam,
                                                     DoRALinear, DoRANorm, IA3Linear, IA3Param, LoRALinear, LoRAParam,
                                                     JOINT_PAD, LORA_MATMULS, lora_dropout, with_lora_matmul)
from configurable_fm.bricks.adapters.prompts import INITS as VIRTUAL_TOKEN_INITS, attach_virtual_tokens
from configurable_fm.models.virtual_tokens import VirtualTokenParam, VirtualTokens
from configurable_fm.bricks.adapters.mixed import (BASE_ID, AdapterIds, AdapterScale, MixedLinear, mix, mixed_modules,
                                                   unmix, uses_small_batch_path, with_adapter_ids,
                                                   with_small_batch_path)
from configurable_fm.interop.peft import from_peft, read_peft, to_peft

__all__ = [
    "attach_experts", "ExpertLoRA", "expert_loras",
    "attach", "merge", "unmerge", "detach", "adapters", "adapted_modules", "adapter_state", "as_delta", "path_key",
    "adapter_bricks", "attach_bricks", "save_adapter", "load_adapter", "from_peft", "read_peft", "to_peft",
    "AdaptedLinear", "LoRALinear", "DoRALinear", "IA3Linear", "AdapterParam", "LoRAParam", "IA3Param", "DoRANorm",
    "AdapterError", "ADAPTER_TYPES", "lora_dropout", "with_lora_matmul", "LORA_MATMULS", "JOINT_PAD", "KINDS",
    "LORA_INITS", "IA3_INITS", "FEEDFORWARD", "DEFAULT_RANK",
    "DEFAULT_ALPHA", "mix", "with_adapter_ids", "with_small_batch_path", "uses_small_batch_path", "unmix",
    "mixed_modules", "MixedLinear", "AdapterIds",
    "AdapterScale", "BASE_ID", "combine", "combine_exact", "CombineReport", "peft_merge", "check_options",
    "COMBINATIONS", "attach_bottleneck", "bottleneck_targets", "BottleneckLinear", "BottleneckParam",
    "BOTTLENECK_INITS", "NON_LINEARITIES", "check_mergeable", "attach_virtual_tokens", "VirtualTokens", "VirtualTokenParam", "VIRTUAL_TOKEN_INITS",
]
