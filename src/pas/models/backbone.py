"""The timm backbone that `pretrain` trains and `evaluate` measures, as a folder timm itself can load.

A backbone folder holds `config.json` (timm's Hugging Face format: `architecture`, `model_args`,
`pretrained_cfg` with the input size and normalisation) and `model.safetensors`. The `models` stage writes
`models/backbone_init/` (the architecture with seeded random-init weights, or an existing checkpoint for
real runs); `pretrain` writes `models/backbone/` in the same format. Users load either with timm alone:

    import timm
    model = timm.create_model("local-dir:models/backbone", pretrained=True)   # tested: timm 1.0.31
    cfg = timm.data.resolve_data_config({}, model=model)                        # input size, mean/std

(older timm: `timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(
file="models/backbone/model.safetensors"), **model_args)` with `arch`/`model_args` from config.json.)

The model is always created with `num_classes=0`, so `model(x)` returns pooled features (B, num_features).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from pas.jsonio import write_json

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def read_config(path: str | Path | Mapping[str, Any]) -> dict:
    """The timm config of a backbone folder (or a config mapping, returned as a dict)."""
    if isinstance(path, Mapping):
        return dict(path)
    path = Path(path)
    cfg_file = path / CONFIG_NAME if path.is_dir() else path
    try:
        return json.loads(cfg_file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{cfg_file}: no backbone config (run the `models` stage)") from None


def is_vit(cfg_or_model: Any) -> bool:
    """True for transformer backbones (linear probe: AdamW + cosine), False for CNNs (SGD + steps)."""
    if isinstance(cfg_or_model, Mapping):
        return bool(cfg_or_model.get("pretrained_cfg", {}).get("fixed_input_size", False))
    return hasattr(cfg_or_model, "patch_embed")


def create_backbone(config_dir_or_dict: str | Path | Mapping[str, Any], pretrained_weights: str | Path | None = None,
                    load_weights: bool = True):
    """Build the timm backbone described by a folder's config.json (or the parsed dict).

    Weights: `pretrained_weights` (a .safetensors file or a backbone folder) if given, else the folder's
    own `model.safetensors` when it exists and `load_weights`; otherwise timm's own random init.
    """
    import timm

    cfg = read_config(config_dir_or_dict)
    model_args = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.get("model_args", {}).items()}
    model_args["num_classes"] = 0
    model = timm.create_model(cfg["architecture"], pretrained=False, **model_args)
    weights = None
    if pretrained_weights is not None:
        weights = Path(pretrained_weights)
        if weights.is_dir():
            weights = weights / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: backbone weights not found")
    elif load_weights and not isinstance(config_dir_or_dict, Mapping):
        own = Path(config_dir_or_dict)
        own = own / WEIGHTS_NAME if own.is_dir() else own.parent / WEIGHTS_NAME
        weights = own if own.is_file() else None
    if weights is not None:
        load_weights_into(model, weights)
    return model


def load_weights_into(model, path: str | Path) -> None:
    """Load a safetensors (or torch) state dict into `model`, naming the file on mismatch."""
    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit backbone {type(model).__name__}: {e}") from None


def save_backbone(model, out_dir: str | Path, image_size: int | None = None) -> Path:
    """Write `model` as a timm-loadable folder: model.safetensors + config.json (sorted, reproducible)."""
    import torch
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_NAME))
    tmp = out_dir / (CONFIG_NAME + ".tmp")
    overlay: dict[str, Any] = {"tag": "pas", "custom_load": False}
    if image_size is not None:
        overlay["input_size"] = [3, int(image_size), int(image_size)]
    with torch.no_grad():
        save_config_for_hf(model, str(tmp), model_config={"pretrained_cfg": overlay})
    cfg = json.loads(tmp.read_text())
    tmp.unlink()
    # the architecture's default pretrained_cfg names hub weights and their licence: not ours
    for key in ("license", "hf_hub_id", "url", "paper_ids", "paper_name", "origin_url", "notes",
                "test_input_size", "test_crop_pct"):
        cfg.get("pretrained_cfg", {}).pop(key, None)
    write_json(out_dir / CONFIG_NAME, cfg)
    return out_dir


def write_backbone_init(spec: Mapping[str, Any], out_dir: str | Path) -> Path:
    """The `models` stage hook: `models/backbone_init/` from `models.backbone_init` of params.yaml.

    `spec` = {kind: timm, name: <timm architecture>, kwargs: {...}, seed: 0, weights: <optional path>}.
    Offline it holds timm's random init drawn under `seed` (so pretrain and the random-init baseline start
    from the same bytes); `weights` (a local .safetensors/.pth file or backbone folder) replaces it, e.g.
    an ImageNet checkpoint fetched once for a real run. ViTs take their input size from `kwargs.img_size`.
    """
    import timm
    import torch

    name = spec["name"]
    kwargs = dict(spec.get("kwargs") or {})
    if not timm.is_model(name):
        raise ValueError(f"models.backbone_init.name={name!r}: unknown timm model (see timm.list_models())")
    kwargs["num_classes"] = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(spec.get("seed", 0)))
        model = timm.create_model(name, pretrained=False, **kwargs)
    if spec.get("weights"):
        w = Path(spec["weights"])
        load_weights_into(model, w / WEIGHTS_NAME if w.is_dir() else w)
    size = kwargs.get("img_size")
    size = size[-1] if isinstance(size, (list, tuple)) else size
    return save_backbone(model, out_dir, image_size=size)
