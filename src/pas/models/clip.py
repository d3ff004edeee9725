"""CLIP (open_clip): one loader for every CLIP the pipeline uses, always from a local folder.

A folder holds `open_clip_config.json` ({"model_cfg", "preprocess_cfg"}, the format of open_clip's
hub repos) and `open_clip_model.safetensors`; open_clip loads it with the `local-dir:` schema.
The `models` stage writes such a folder either from real pretrained weights (`save_pretrained_clip`,
downloads once) or from a tiny seeded random init (`build_tiny_clip`, offline).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pas.jsonio import write_json
from pas.models.files import fingerprint_dir, seed_everything

CONFIG = "open_clip_config.json"
WEIGHTS = "open_clip_model.safetensors"

# A small CLIP of the real architecture (ViT image tower + transformer text tower, open_clip's
# BPE tokenizer): ~8M params, 64 px, ≈500 img/s on 2 CPU cores.
TINY_MODEL_CFG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _save(model, model_cfg: dict, preprocess_cfg: dict, out_dir: Path, meta: dict) -> Path:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS), metadata={"format": "pt"})
    write_json(out_dir / CONFIG, {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg})
    write_json(out_dir / "pas_model.json", meta)
    return out_dir


def _preprocess_cfg(size: int, tag: dict) -> dict:
    """open_clip's preprocess_cfg: a pretrained tag's normalisation and resize, OpenAI's by default."""
    return {"size": size, "mean": list(tag.get("mean", OPENAI_MEAN)), "std": list(tag.get("std", OPENAI_STD)),
            "interpolation": tag.get("interpolation", "bicubic"), "resize_mode": tag.get("resize_mode", "shortest")}


def build_tiny_clip(out_dir: str | Path, seed: int = 0, model_cfg: dict | None = None) -> Path:
    """Seeded random-init CLIP in open_clip's folder format. Same seed → byte-identical files."""
    import open_clip

    cfg = dict(model_cfg or TINY_MODEL_CFG)
    seed_everything(seed)
    model = open_clip.CLIP(**cfg)
    # open_clip inits logit_scale to log(1/0.07); real CLIP ends training at 100 — use that so
    # p_c = softmax(100·cos) behaves as in the paper's formulas.
    model.logit_scale.data.fill_(float(np.log(100.0)))
    pre = _preprocess_cfg(cfg["vision_cfg"]["image_size"], {})
    return _save(model, cfg, pre, Path(out_dir), {"kind": "tiny", "seed": seed})


def save_pretrained_clip(name: str, pretrained: str, out_dir: str | Path,
                         cache_dir: str | None = None) -> Path:
    """Download real weights once (open_clip `name` + `pretrained` tag, e.g. ViT-L-14 + openai)
    and store them in the local folder format."""
    import open_clip

    model = open_clip.create_model(name, pretrained=pretrained, cache_dir=cache_dir)
    model_cfg = dict(open_clip.get_model_config(name))
    tag = open_clip.get_pretrained_cfg(name, pretrained) or {}
    if tag.get("quick_gelu"):
        model_cfg["quick_gelu"] = True
    pre = _preprocess_cfg(model_cfg["vision_cfg"]["image_size"], tag)
    return _save(model, model_cfg, pre, Path(out_dir),
                 {"kind": "pretrained", "name": name, "pretrained": pretrained})


@dataclass
class Clip:
    """A loaded CLIP with its matching preprocessing and tokenizer."""

    model: Any
    preprocess: Any
    tokenizer: Any
    fingerprint: str
    device: str = "cpu"

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())

    @property
    def dim(self) -> int:
        proj = getattr(self.model, "text_projection", None)
        return int(proj.shape[1]) if proj is not None else int(self.encode_texts(["x"]).shape[1])

    def encode_images(self, images: Sequence, batch_size: int = 64) -> np.ndarray:
        """PIL images → (N, D) float32, L2-normalised."""
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(images), batch_size):
                x = torch.stack([self.preprocess(im.convert("RGB")) for im in images[i:i + batch_size]])
                f = self.model.encode_image(x.to(self.device), normalize=True)
                out.append(f.float().cpu().numpy())
        return _stack(out, self)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Strings → (M, D) float32, L2-normalised."""
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                tok = self.tokenizer(list(texts[i:i + batch_size])).to(self.device)
                out.append(self.model.encode_text(tok, normalize=True).float().cpu().numpy())
        return _stack(out, self)


def _stack(chunks: list[np.ndarray], clip: Clip) -> np.ndarray:
    if chunks:
        return np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)
    return np.zeros((0, clip.dim), np.float32)


def load_clip(model_dir: str | Path, device: str = "cpu") -> Clip:
    """Load a CLIP folder written by `build_tiny_clip` / `save_pretrained_clip` / `clip_train.train_clip`
    (its det_trunk tower: `pas.models.trunk_clip`, which open_clip cannot build from a config)."""
    import open_clip

    model_dir = Path(model_dir)
    if not (model_dir / CONFIG).is_file():
        raise FileNotFoundError(f"{model_dir}: not a CLIP model folder (no {CONFIG}); run `dvc repro models`")
    config = json.loads((model_dir / CONFIG).read_text())
    if config["model_cfg"].get("vision_cfg", {}).get("tower") == "det_trunk":
        from pas.models.trunk_clip import load_trunk_clip

        model, preprocess, tokenizer = load_trunk_clip(model_dir, config)
        model.to(device)
    else:
        name = f"local-dir:{model_dir.resolve()}"
        kwargs = {}
        text_cfg = config["model_cfg"].get("text_cfg", {})
        if "hf_model_name" in text_cfg:
            # an HF text tower (the offline trained CLIP) keeps its config in the folder itself; the saved
            # name is a placeholder, so the folder is relocatable. Its weights are in the CLIP checkpoint.
            kwargs["text_cfg"] = {**text_cfg, "hf_model_name": str(model_dir.resolve()),
                                  "hf_tokenizer_name": str(model_dir.resolve()), "hf_model_pretrained": False}
        model, _, preprocess = open_clip.create_model_and_transforms(name, device=device, **kwargs)
        model.eval()
        tokenizer = open_clip.get_tokenizer(name)
    return Clip(model=model, preprocess=preprocess, tokenizer=tokenizer,
                fingerprint=fingerprint_dir(model_dir), device=device)
