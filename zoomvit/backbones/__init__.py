"""Backbone adapters: everything that depends on a model family, behind one small interface (`Backbone`, in
`base.py`, which says what each family provides and holds the pre-norm block they all share).

One module per family: `hf_vit` (ViT, DeiT, ViT-MSN), `dinov2` (with registers too), `clip`, `siglip`, `beit`
(BEiT, Data2Vec-vision), `timm_vit` (timm's VisionTransformer family) and `timm_preprocess` (timm's evaluation
transform). Adding a family is one short module here and one line in `FAMILIES`.
"""

from __future__ import annotations

import torch

from .base import Backbone
from .beit import HFBeit, HFData2VecVision
from .clip import HFCLIP
from .dinov2 import HFDinov2
from .hf_vit import HFViT
from .siglip import HFSiglip
from .timm_preprocess import TimmPreprocessor
from .timm_vit import TimmViT

__all__ = ["FAMILIES", "FAMILY_NAMES", "Backbone", "TimmPreprocessor", "adapter_for", "supported_families"]

# model_type -> adapter. The README's list of supported families comes from this table.
FAMILIES = {
    "vit": HFViT,
    "deit": HFViT,
    "vit_msn": HFViT,
    "dinov2": HFDinov2,
    "dinov2_with_registers": HFDinov2,
    "clip": HFCLIP,
    "siglip": HFSiglip,
    "beit": HFBeit,
    "data2vec-vision": HFData2VecVision,
    "timm_wrapper": TimmViT,  # a folder in timm's hub layout or a hub timm/... id, loaded by transformers
}
FAMILY_NAMES = {
    "vit": "ViT",
    "deit": "DeiT",
    "vit_msn": "ViT-MSN",
    "dinov2": "DINOv2",
    "dinov2_with_registers": "DINOv2 with registers",
    "clip": "CLIP image classifier",
    "siglip": "SigLIP image classifier",
    "beit": "BEiT",
    "data2vec-vision": "Data2Vec-vision",
    "timm_wrapper": "timm VisionTransformer (class-token, distilled, register, layer-scale and average-pool models)",
}


def supported_families() -> str:
    """The families with an adapter, as error messages list them: "ViT ('vit'), DeiT ('deit'), ..."."""
    return ", ".join(f"{label} ('{key}')" for key, label in FAMILY_NAMES.items())


def adapter_for(model: torch.nn.Module) -> Backbone:
    if type(model).__module__.startswith("timm."):  # a timm model built by timm itself (timm:<name or folder>)
        return TimmViT(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"a '{model_type}' model; supported families: {supported_families()}")
    return FAMILIES[model_type](model)
