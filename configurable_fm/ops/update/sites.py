"""Where locate-then-edit methods read keys and write values: the MLP output projection of one layer.

    site = edit_site(model, 5)
    site.kernel        # 'layers.5.mlp.down_proj.kernel'  (F, D): y = k @ W (+ b)
    site.key_point     # 'layers.5.mlp.down_proj.input'   the key k (B, T, F): act(gate(x)) * up(x) for SwiGLU
    site.value_point   # 'layers.5.mlp.down_proj.output'  the value W^T k + b (B, T, D), ROME's v
    site.layer_output  # 'layers.5.output'                the residual stream after the layer, MEMIT's z

Families, recognised by their parameter paths (so any model that names its tensors like one of them works):
    llama (dense):  layers.<l>.mlp.down_proj  (key = act(gate_proj(x)) * up_proj(x), the tap 'mlp.hidden')
    gpt2:           h.<l>.mlp.c_proj          (key = gelu(c_fc(x)), the tap 'mlp.hidden'); it has a bias
MoE layers (one down_proj per expert) are not supported: there is no single key -> value map.

`upstream_fingerprint(model, site)` hashes every parameter the keys of the site depend on (the embeddings,
the layers before it, and the site's own layer except the edited projection), so key statistics computed on one
model are recognised as valid for another that differs only downstream (e.g. after an edit of that very
projection) and invalid after any upstream change.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Mapping

import jax
import numpy as np
from flax import nnx

from configurable_fm.bricks.paths import flat_params
from configurable_fm.checks import is_int
from configurable_fm.errors import UserError

# (layer container, the edited projection inside a layer, top-level modules after the stack)
FAMILIES = {
    "llama": ("layers", "mlp.down_proj", ("norm", "lm_head")),
    "gpt2": ("h", "mlp.c_proj", ("ln_f", "lm_head")),
}


class SiteError(UserError, ValueError):
    """A model or layer that has no editable MLP projection (unknown family, MoE layer, layer out of range)."""


@dataclasses.dataclass(frozen=True)
class EditSite:
    """The MLP output projection of one layer: parameter paths and tap points (module docstring)."""

    family: str
    layer: int
    container: str  # 'layers' | 'h'
    projection: str  # 'mlp.down_proj' | 'mlp.c_proj'
    num_layers: int

    @property
    def prefix(self) -> str:
        return f"{self.container}.{self.layer}"

    @property
    def module(self) -> str:
        return f"{self.prefix}.{self.projection}"

    @property
    def kernel(self) -> str:
        return f"{self.module}.kernel"

    @property
    def bias(self) -> str:
        return f"{self.module}.bias"

    @property
    def key_point(self) -> str:
        return f"{self.module}.input"

    @property
    def value_point(self) -> str:
        return f"{self.module}.output"

    @property
    def layer_output(self) -> str:
        return f"{self.prefix}.output"


def family_of(flat: Mapping[str, object]) -> str:
    """'llama' or 'gpt2' from the parameter paths; SiteError listing what is supported otherwise."""
    for name, (container, projection, _) in FAMILIES.items():
        if f"{container}.0.{projection}.kernel" in flat:
            return name
    if any(re.fullmatch(r"layers\.\d+\.mlp\.experts\..*", p) or ".mlp.router." in p for p in flat):
        raise SiteError("locate-then-edit needs a dense MLP: this model's layers are mixtures of experts (one "
                        "down_proj per expert), which have no single key -> value map")
    supported = [f"{c}.<l>.{p}.kernel ({n})" for n, (c, p, _) in FAMILIES.items()]
    raise SiteError(f"no editable MLP projection found; supported layouts: {supported}")


def num_layers(flat: Mapping[str, object], container: str) -> int:
    found = {int(m.group(1)) for p in flat for m in [re.match(rf"{re.escape(container)}\.(\d+)\.", p)] if m}
    return max(found) + 1 if found else 0


def edit_site(model_or_flat, layer: int) -> EditSite:
    """The EditSite of `layer` (0-based) of a model or flat {path: array} dict; SiteError when the model has no
    such layer or no dense MLP projection there."""
    flat = flat_params(model_or_flat) if isinstance(model_or_flat, nnx.Module) else dict(model_or_flat)
    family = family_of(flat)
    container, projection, _ = FAMILIES[family]
    n = num_layers(flat, container)
    if not is_int(layer) or not 0 <= layer < n:
        raise SiteError(f"layer {layer!r} is not a layer of this {family} model (0..{n - 1})")
    site = EditSite(family, int(layer), container, projection, n)
    if site.kernel not in flat:
        raise SiteError(f"{site.kernel} is not a parameter of this model (is layer {layer} a mixture of experts?)")
    return site


def upstream_paths(flat: Mapping[str, object], site: EditSite) -> list[str]:
    """The parameter paths the keys of `site` depend on, in the model's order (module docstring)."""
    _, _, after = FAMILIES[site.family]
    out = []
    for p in flat:
        m = re.match(rf"{re.escape(site.container)}\.(\d+)\.", p)
        if m:
            i = int(m.group(1))
            if i < site.layer or (i == site.layer and not p.startswith(site.module + ".")):
                out.append(p)
        elif not any(p == a or p.startswith(a + ".") for a in after):
            out.append(p)
    return out


def param_digest(path: str, value) -> bytes:
    """sha256 over (path, dtype, shape, bytes) of one parameter."""
    a = np.asarray(jax.device_get(value))
    h = hashlib.sha256(f"{path}|{a.dtype.str}|{a.shape}|".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.digest()


def upstream_fingerprint(model_or_flat, site: EditSite, *, digests: dict[str, bytes] | None = None) -> str:
    """sha256 (hex) of the digests of every upstream parameter of `site`, in order. `digests` ({path: digest})
    caches per-parameter digests across calls (several layers of one model hash each parameter once)."""
    flat = flat_params(model_or_flat) if isinstance(model_or_flat, nnx.Module) else dict(model_or_flat)
    digests = {} if digests is None else digests
    h = hashlib.sha256()
    for p in upstream_paths(flat, site):
        if p not in digests:
            digests[p] = param_digest(p, flat[p])
        h.update(digests[p])
    return h.hexdigest()
