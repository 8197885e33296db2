"""ZoomViT Explorer: see where a Vision Transformer looks, zoom in on it, and prune what it ignores.

    import zoomvit
    bundle = zoomvit.load_model("facebook/deit-tiny-patch16-224")   # hub id, folder or timm:NAME
    analysis = zoomvit.analyze(bundle, "photo.jpg")                   # one cached forward + backward
    analysis.top(5), analysis.rollout(), analysis.intent()

Every other public name lives at its module: `from zoomvit.zoom import zoom`, `from zoomvit.pruning import prune`,
`from zoomvit.intent import diagnose`, `from zoomvit.evaluation.runner import evaluate` (docs/architecture.md).

The names below are loaded on first use, so that `import zoomvit` (and `zoomvit --help`) does not import torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_HOMES = {
    "load_model": "zoomvit.models",
    "ViTBundle": "zoomvit.models",
    "analyze": "zoomvit.vit_analyzer",
    "analyze_many": "zoomvit.vit_analyzer",
    "Analysis": "zoomvit.vit_analyzer",
    "Prediction": "zoomvit.vit_analyzer",
}

__all__ = ["__version__", *_HOMES]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'zoomvit' has no attribute {name!r}")
    value = getattr(import_module(_HOMES[name]), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
