"""Model loading: hub ids, local folders and timm, safetensors only, on a chosen device and precision.

A loaded model is a `ViTBundle`: the classifier, its preprocessing, its labels and its family's adapter.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from zoomvit import backbones, config
from zoomvit.devices import resolve_device, resolve_dtype
from zoomvit.errors import ModelLoadError, ZoomViTError


@dataclass
class ViTBundle:
    """A loaded classifier and the facts about its token layout that every map needs."""

    model: torch.nn.Module
    processor: object
    name: str
    patch_size: int
    input_size: tuple[int, int]  # (height, width) the model was trained at
    num_special: int  # CLS (+ distillation token for distilled DeiT)
    id2label: dict
    device: torch.device = torch.device("cpu")  # where the model's weights are (load_model moves them there)
    dtype: torch.dtype = torch.float32  # the weights' precision; inputs are cast to it, outputs back to float32

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def place(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Model input on the model's device, in its precision (no copy when it already is)."""
        return pixel_values.to(self.device, self.dtype)

    @functools.cached_property
    def adapter(self) -> backbones.Backbone:
        """Everything that depends on the model family (see the backbones package)."""
        return backbones.adapter_for(self.model)

    @property
    def backbone(self):
        return self.model.base_model

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    @property
    def num_heads(self) -> int:
        return self.adapter.num_heads

    def label(self, index: int) -> str:
        return str(self.id2label.get(int(index), f"class {int(index)}"))

    def find_label(self, text: str) -> int:
        return match_label(self.id2label, text)


def match_label(id2label: dict, text) -> int:
    """A class index from an index, an exact label, or a unique case-insensitive substring of a label.

    id2label may have int keys (a loaded model) or str keys (config.json read as JSON), so the CLI can check
    --target before the weights load."""
    labels = {int(i): str(name) for i, name in id2label.items()}
    text = str(text).strip()
    if text.lstrip("-").isdigit():
        index = int(text)
        if not 0 <= index < len(labels):
            raise ZoomViTError(f"Class index {index} is out of range (0..{len(labels) - 1}).")
        return index
    lowered = text.lower()

    def one_of(indices):  # a name that several classes share (ImageNet has two "crane"s): ask, never guess
        listed = ", ".join(f"'{labels[i]}' [{i}]" for i in indices[:5])
        raise ZoomViTError(f"'{text}' names {len(indices)} classes: {listed}; give the class index to choose.")

    exact = [i for i, name in labels.items() if name.lower() == lowered]
    if len(exact) == 1:
        return exact[0]
    if exact:
        one_of(exact)
    if _is_number(text):  # "NaN", "inf", "2.5", "1e3" (an API's float) would otherwise match "banana" or "Info..."
        raise ZoomViTError(f"'{text}' is not a class: give a class index (0..{len(labels) - 1}) or label text.")
    names = [(i, n.lower()) for i, n in labels.items()]
    # Prefer a match on a whole comma-separated synonym ("tench" in "tench, Tinca tinca").
    whole = [i for i, n in names if lowered in [s.strip() for s in n.split(",")]]
    if len(whole) == 1:
        return whole[0]
    if whole:
        one_of(whole)
    partial = [i for i, n in names if lowered in n]
    if len(partial) == 1:
        return partial[0]
    if not partial:
        raise ZoomViTError(f"No class label matches '{text}'.")
    examples = ", ".join(labels[i] for i in partial[:5])
    raise ZoomViTError(f"'{text}' matches {len(partial)} labels (e.g. {examples}); be more specific.")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


_LOCAL_HINT = f"pass a local folder with --model PATH or {config.MODEL_ENV_VAR}=PATH"


def _first_line(exc: BaseException) -> str:
    """An exception's first non-empty line, whole: hub errors run over several lines; none is cut mid-word. torch's
    and timm's refusals to unpickle advise retrying with weights_only=False: that advice is never passed on."""
    text = str(exc)
    if "weights_only" in text or "weights only" in text.lower():
        return "it would need a pickle file, which ZoomViT never loads (safetensors only)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick request to the hub endpoint: the download path retries for minutes when the hub is down."""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # DNS failure, refused connection, timeout, proxy error: whatever the transport raises
        return False
    return True


def local_source(name: str) -> tuple[str, bool]:
    """(what from_pretrained takes, local files only) for a model that load_model has loaded: its folder, or the
    hub id served from the cache when offline."""
    folder = _local_folder(config.resolve_model_name(name))
    return (str(folder), True) if folder is not None else (config.resolve_model_name(name), _hub_offline())


def _local_folder(name: str) -> Path | None:
    """The folder `name` points at, None for a hub id; ModelLoadError for a path that is not a folder."""
    local = Path(name).expanduser()
    try:
        if local.is_dir():
            return local
        exists = local.exists()
    except OSError as exc:  # a name too long for a path (and a hub id is at most 96 characters)
        shown = name if len(name) <= 80 else f"{name[:80]}... ({len(name)} characters)"
        raise ModelLoadError(
            f"Model folder not found, and not a valid hub id either: {shown} "
            f"({(exc.strerror or type(exc).__name__).lower()})"
        ) from None
    if exists:
        raise ModelLoadError(f"Model path is a file, not a folder: {name}")
    if name.startswith((".", "/", "~")):
        raise ModelLoadError(f"Model folder not found: {name}")
    return None


def read_model_config(name: str | None = None) -> dict | None:
    """The model's config.json as a dict, read without loading anything, and checked to be a supported
    classifier that needs no remote code. From a local folder or the hub cache; None for a hub id not in it."""
    name = config.resolve_model_name(name)
    if name.startswith(TIMM_PREFIX):  # checked when timm loads it
        return None
    folder = _local_folder(name)
    if folder is not None:
        path = folder / "config.json"
        if not path.is_file():
            raise ModelLoadError(
                f"Could not load model '{name}': the folder has no config.json (a model folder in Hugging Face "
                "layout holds config.json, model.safetensors and preprocessor_config.json)."
            )
    else:
        from huggingface_hub import try_to_load_from_cache

        try:
            path = try_to_load_from_cache(name, "config.json")
        except ValueError:  # HFValidationError: not a repo id either
            raise ModelLoadError(f"Model folder not found, and not a valid hub id either: {name}") from None
        if not isinstance(path, str):
            return None
    try:
        cfg = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"Could not read the config.json of model '{name}': {_first_line(exc)}") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"The config.json of model '{name}' is not a JSON object.")
    _check_model_config(name, cfg)
    return cfg


def _model_type(cfg: dict) -> str | None:
    """The config's model_type; a folder in timm's hub layout has none, and transformers loads it as
    TimmWrapperForImageClassification ("timm_wrapper")."""
    if "model_type" not in cfg and "architecture" in cfg and "pretrained_cfg" in cfg:
        return "timm_wrapper"
    return cfg.get("model_type")


# config.json's model_args go to timm.create_model as they are: only these architecture settings pass. Others make
# timm read weights from elsewhere (checkpoint_path loads a pickle; pretrained, pretrained_cfg and its overlay pick
# the weights' source) or build something else (features_only), so they are refused.
TIMM_MODEL_ARGS = frozenset(
    """img_size patch_size in_chans global_pool embed_dim depth num_heads mlp_ratio qkv_bias qk_norm scale_attn_norm
    scale_mlp_norm proj_bias init_values class_token pos_embed no_embed_class reg_tokens pre_norm final_norm fc_norm
    pool_include_prefix dynamic_img_size dynamic_img_pad drop_rate pos_drop_rate patch_drop_rate proj_drop_rate
    attn_drop_rate drop_path_rate weight_init fix_init norm_layer act_layer""".split()
)
# pretrained_cfg keys that name where weights come from: the weights are model.safetensors beside config.json alone,
# so a config.json that names another source is refused rather than silently overridden.
TIMM_WEIGHT_SOURCES = ("file", "url", "hf_hub_id", "hf_hub_filename", "state_dict", "source", "custom_load")


def _timm_model_args(name: str, cfg: dict) -> dict:
    """The model_args of a config.json in timm's layout, refused unless each is an allowed architecture setting (and
    a pretrained_cfg that names another weights source, refused)."""
    args = cfg.get("model_args") or {}
    if not isinstance(args, dict):
        raise ModelLoadError(f"Could not load model '{name}': model_args in its config.json is not a JSON object.")
    refused = sorted(key for key in args if key not in TIMM_MODEL_ARGS)
    if refused:
        raise ModelLoadError(
            f"Could not load model '{name}': its config.json sets model_args {', '.join(map(repr, refused))}, which "
            "ZoomViT does not pass to timm (only architecture settings such as depth or embed_dim: the weights come "
            "from model.safetensors alone)."
        )
    pretrained_cfg = cfg.get("pretrained_cfg")
    named = [key for key in TIMM_WEIGHT_SOURCES if isinstance(pretrained_cfg, dict) and pretrained_cfg.get(key)]
    if named:
        raise ModelLoadError(
            f"Could not load model '{name}': its config.json's pretrained_cfg names a weights source "
            f"({', '.join(named)}); ZoomViT loads only the model.safetensors beside config.json."
        )
    return args


def _check_model_config(name: str, cfg: dict) -> None:
    if cfg.get("auto_map"):
        raise ModelLoadError(
            f"Could not load model '{name}': it needs custom code from its repository (auto_map in config.json), "
            "and ZoomViT never runs remote code."
        )
    model_type = _model_type(cfg)
    if model_type not in backbones.FAMILIES:
        kind = f"a '{model_type}' model" if model_type else "a model without a model_type in config.json"
        raise ModelLoadError(
            f"Could not load model '{name}': it is {kind}; ZoomViT supports only {backbones.supported_families()} "
            "image classifiers."
        )
    if model_type == "timm_wrapper":  # transformers hands model_args to timm.create_model too
        _timm_model_args(name, cfg)


def _check_local_weights(name: str, folder: Path, needs_preprocessor: bool = True) -> None:
    """Safetensors weights present and readable; pickle weights are refused (unpickling can run code). A timm
    folder keeps its preprocessing in config.json (needs_preprocessor=False)."""
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        if pickles:
            raise ModelLoadError(
                f"Could not load model '{name}': the folder has only PyTorch pickle weights ({', '.join(pickles)}), "
                "which ZoomViT does not load because unpickling a file can run arbitrary code; if you trust it, "
                "convert it once with transformers (from_pretrained, then save_pretrained writes model.safetensors)."
            )
        raise ModelLoadError(f"Could not load model '{name}': the folder has no weights (model.safetensors).")
    from safetensors import safe_open

    for shard in shards:
        try:
            with safe_open(shard, framework="pt"):  # parses the header and checks it covers the whole file
                pass
        except Exception as exc:  # SafetensorError derives from Exception only
            raise ModelLoadError(
                f"Could not load model '{name}': {shard.name} is corrupt or incomplete ({_first_line(exc)})."
            ) from None
    if needs_preprocessor and not (folder / "preprocessor_config.json").is_file():
        raise ModelLoadError(
            f"Could not load model '{name}': the folder has no preprocessor_config.json (the image preprocessing)."
        )


def load_model(name: str | None = None, device=None, dtype=None) -> ViTBundle:
    """Load a classifier of a family with an adapter (backbones.FAMILIES; others would load but give wrong maps and
    pruning, so they are refused up front) from a local folder or a hub id, safetensors weights only, with eager
    attention (the model's own attentions stay available to check the adapter's against), on `device` in `dtype`
    (see resolve_device and resolve_dtype; None: $ZOOMVIT_DEVICE / $ZOOMVIT_DTYPE, else auto / float32). Every
    failure is a one-line ZoomViTError (ModelLoadError for the model itself)."""
    name = config.resolve_model_name(name)
    device = resolve_device(device)  # a bad device or dtype fails before anything loads
    dtype = resolve_dtype(dtype, device)
    if name.startswith(TIMM_PREFIX):
        return _load_with_timm(name, device, dtype)
    folder = _local_folder(name)
    cfg = read_model_config(name)
    timm_layout = cfg is not None and _model_type(cfg) == "timm_wrapper"
    if folder is not None:
        _check_local_weights(name, folder, needs_preprocessor=not timm_layout)
        source, local_only = str(folder), True
    else:
        # Offline or unreachable, only the cache can serve; say so at once rather than after the hub's retries.
        local_only = _hub_offline() or not _hub_reachable()
        if local_only and cfg is None:
            why = "offline (HF_HUB_OFFLINE is set)" if _hub_offline() else "the Hugging Face hub is unreachable"
            raise ModelLoadError(
                f"Could not load model '{name}': {why} and it is not in the local cache; {_LOCAL_HINT}"
            )
        source = name
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # missing weights are reported below, in one line, not as a log table
    try:
        if cfg is None:  # a hub id fetched now: check its config before downloading the weights
            from huggingface_hub import hf_hub_download

            cfg = json.loads(Path(hf_hub_download(name, "config.json")).read_text("utf-8"))
            _check_model_config(name, cfg)
            timm_layout = _model_type(cfg) == "timm_wrapper"
        processor = _image_processor(name, source, local_only, timm_layout)
        model, info = AutoModelForImageClassification.from_pretrained(
            source,
            attn_implementation="eager",
            use_safetensors=True,
            local_files_only=local_only,
            output_loading_info=True,
        )
    except ModelLoadError:
        raise
    except Exception as exc:  # hub, file and transformers errors alike: report the cause in one line
        raise ModelLoadError(f"Could not load model '{name}': {_first_line(exc)}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = info.get("missing_keys") or []
    if missing:  # transformers would run these tensors randomly initialised
        raise ModelLoadError(
            f"Could not load model '{name}': its weights do not match its config ({len(missing)} tensors missing, "
            f"e.g. {sorted(missing)[0]})."
        )
    return _bundle(name, model, processor, dict(model.config.id2label), device, dtype)


def _image_processor(name: str, source: str, local_only: bool, timm_layout: bool):
    """The model's image preprocessing. A preprocessor_config.json for other input (a Whisper feature extractor
    for audio) is refused here, in one line, rather than failing on the first image."""
    from transformers import AutoImageProcessor
    from transformers.image_processing_utils import BaseImageProcessor

    if timm_layout:  # timm's own evaluation transform, from the pretrained_cfg in config.json
        processor = AutoImageProcessor.from_pretrained(source, local_files_only=local_only)
        return backbones.TimmPreprocessor(processor.data_config)
    try:  # PIL, not torchvision: the same pixels whether or not torchvision is installed
        processor = AutoImageProcessor.from_pretrained(source, local_files_only=local_only, backend="pil")
    except ValueError as exc:  # its message lists every model type transformers knows: hundreds of names
        if "Unrecognized image processor" not in str(exc):
            raise
        processor = None
    if isinstance(processor, BaseImageProcessor):
        return processor
    if processor is not None:
        what = f"a '{type(processor).__name__}', not an image processor"
    else:
        try:
            declared = json.loads((Path(source) / "preprocessor_config.json").read_text(encoding="utf-8"))
            kind = declared.get("image_processor_type") or declared.get("feature_extractor_type")
        except (OSError, ValueError, AttributeError):  # a hub id, unreadable JSON, not an object
            kind = None
        what = (
            f"a '{kind}', which transformers does not know as an image processor"
            if kind
            else "no image processor that transformers knows"
        )
    raise ModelLoadError(f"Could not load model '{name}': its preprocessor_config.json describes {what}.")


def _bundle(name: str, model, processor, id2label: dict, device: torch.device, dtype: torch.dtype) -> ViTBundle:
    model.eval()
    try:
        adapter = backbones.adapter_for(model)
    except ValueError as exc:
        raise ModelLoadError(f"Could not load model '{name}': it is {exc}.") from None
    try:
        model.to(device=device, dtype=dtype)
    except (RuntimeError, TypeError) as exc:  # out of GPU memory, a dtype the device lacks
        raise ModelLoadError(f"Could not move model '{name}' to {device} in {dtype}: {_first_line(exc)}") from None
    bundle = ViTBundle(
        model, processor, name, adapter.patch_size, adapter.input_size, adapter.num_prefix, id2label, device, dtype
    )
    bundle.adapter = adapter
    return bundle


TIMM_PREFIX = "timm:"


def _timm_files(name: str, target: str) -> tuple[Path, Path]:
    """(config.json, model.safetensors) of `timm:<folder>` or `timm:<model name>` (its hub repository, from the
    cache when offline), checked like any model folder."""
    folder = _local_folder(target)
    if folder is not None:
        _check_local_weights(name, folder, needs_preprocessor=False)
        if not (folder / "config.json").is_file():
            raise ModelLoadError(
                f"Could not load model '{name}': the folder has no config.json (timm's hub layout "
                "holds config.json with 'architecture' and model.safetensors)."
            )
        return folder / "config.json", folder / "model.safetensors"
    import timm

    vit_names = set(timm.list_models(module="vision_transformer")) | set(timm.list_models(module="deit"))
    architecture = target.split(".")[0]
    if architecture not in vit_names:
        known = "an unknown timm model" if not timm.is_model(architecture) else f"timm's '{architecture}'"
        raise ModelLoadError(
            f"Could not load model '{name}': it is {known}; ZoomViT supports timm's "
            "VisionTransformer family (vit_*, deit_*, deit3_*, ...)."
        )
    try:
        pretrained = timm.models.get_pretrained_cfg(target)
    except RuntimeError:  # "Invalid pretrained tag (...)": an architecture.tag timm has no weights under
        tags = [tag.partition(".")[2] for tag in timm.list_pretrained(f"{architecture}.*")]
        raise ModelLoadError(
            f"Could not load model '{name}': timm knows no pretrained tag '{target.partition('.')[2]}' for "
            f"{architecture}" + (f" (its tags: {', '.join(tags)})." if tags else ".")
        ) from None
    repo = pretrained.hf_hub_id if pretrained else None
    if not repo:
        raise ModelLoadError(f"Could not load model '{name}': timm knows no pretrained weights on the hub for it.")
    from huggingface_hub import hf_hub_download

    local_only = _hub_offline() or not _hub_reachable()
    try:
        return tuple(
            Path(hf_hub_download(repo, file, local_files_only=local_only))
            for file in ("config.json", "model.safetensors")
        )
    except Exception as exc:
        why = "offline and not in the local cache" if local_only else _first_line(exc)
        raise ModelLoadError(f"Could not load model '{name}' ({repo}): {why}; {_LOCAL_HINT}") from None


def _load_with_timm(name: str, device: torch.device, dtype: torch.dtype) -> ViTBundle:
    """`timm:<model name>` or `timm:<folder in timm's hub layout>`, built and loaded by timm itself."""
    try:
        import timm
    except ImportError as exc:
        raise ModelLoadError(f"Could not load model '{name}': timm is not installed ({exc}).") from None
    config_path, weights = _timm_files(name, name[len(TIMM_PREFIX) :])
    try:
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
        architecture, pretrained_cfg = cfg["architecture"], dict(cfg.get("pretrained_cfg") or {})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(
            f"Could not load model '{name}': its config.json is not timm's ({_first_line(exc)})."
        ) from None
    model_args = _timm_model_args(name, cfg)
    # The weights come from `weights` alone: no hub source, url, state dict or custom loader from config.json.
    file_only = {"file": str(weights), "source": "", "state_dict": None, "custom_load": False}
    try:
        model = timm.create_model(
            architecture,
            pretrained=True,
            num_classes=cfg.get("num_classes", pretrained_cfg.get("num_classes")),
            pretrained_cfg_overlay={**pretrained_cfg, **file_only},
            **model_args,
        )
        processor = backbones.TimmPreprocessor(timm.data.resolve_data_config(model=model))
    except Exception as exc:  # unknown architecture, weights that do not fit it, unsupported preprocessing
        raise ModelLoadError(f"Could not load model '{name}': {_first_line(exc)}") from None
    labels = cfg.get("label_names") or [f"class {i}" for i in range(model.num_classes)]
    return _bundle(name, model, processor, dict(enumerate(labels)), device, dtype)
