"""The offline CLIP with a frozen pretrained trunk (`pas.models.det_trunk`) as its image tower.

open_clip builds only its own image towers from a config, so this is the one CLIP that
`pas.models.clip.load_clip` builds itself: `TrunkCLIP` has open_clip's model interface (`visual`,
`text`, `logit_scale`, `encode_image`, `encode_text`) with open_clip's HF text tower (the frozen
all-MiniLM-L6-v2) and `TrunkTower` as `visual`. It is saved in the same folder format as every CLIP;
its config's `vision_cfg` says `tower: det_trunk`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pas.models.det_trunk import NODES, RGB_MEAN, RGB_STD, DetTrunk

TOWER = "det_trunk"


class TrunkTower(torch.nn.Module):
    """`DetTrunk` (frozen, onnxruntime) → standardise (buffers `feat_mean`, `feat_std`, the pool's
    feature statistics) → Linear, GELU, Linear. Input: RGB images normalised with RGB_MEAN/RGB_STD."""

    def __init__(self, feature_dim: int, hidden: int, embed_dim: int, nodes=NODES, threads: int = 1):
        super().__init__()
        self.trunk = DetTrunk(nodes, threads)
        self.register_buffer("feat_mean", torch.zeros(feature_dim))
        self.register_buffer("feat_std", torch.ones(feature_dim))
        self.head = torch.nn.Sequential(torch.nn.Linear(feature_dim, hidden), torch.nn.GELU(),
                                        torch.nn.Linear(hidden, embed_dim))

    def trunk_features(self, x: torch.Tensor) -> torch.Tensor:
        """Raw (unstandardised) trunk features of RGB images (B, 3, H, W)."""
        return torch.from_numpy(self.trunk(x.detach().cpu().numpy())).to(x.device)

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """The head's output for raw trunk features: standardised, then the MLP."""
        return self.head((feats - self.feat_mean) / self.feat_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.trunk_features(x))


class TrunkCLIP(torch.nn.Module):
    """`threads`: onnxruntime's for the trunk, a property of where the model runs (not saved: the trunk's
    features do not depend on it, tests/test_det_trunk.py)."""

    def __init__(self, model_cfg: dict, text_pretrained: bool, threads: int = 1):
        from open_clip.model import _build_text_tower

        super().__init__()
        v = model_cfg["vision_cfg"]
        self.visual = TrunkTower(v["feature_dim"], v["hidden"], model_cfg["embed_dim"], v["nodes"], threads)
        self.text = _build_text_tower(model_cfg["embed_dim"],
                                      {**model_cfg["text_cfg"], "hf_model_pretrained": text_pretrained})
        # the paper's formulas use p_c = softmax(100·cos) (real CLIP ends training at 100)
        self.logit_scale = torch.nn.Parameter(torch.tensor(float(np.log(100.0))))

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        f = self.visual(image)
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        f = self.text(text)
        return F.normalize(f, dim=-1) if normalize else f


def vision_cfg(image_size: int, feature_dim: int, hidden: int) -> dict:
    return {"tower": TOWER, "image_size": image_size, "nodes": list(NODES), "feature_dim": feature_dim,
            "hidden": hidden}


def preprocess_cfg(image_size: int) -> dict:
    return {"size": image_size, "mean": list(RGB_MEAN), "std": list(RGB_STD),
            "interpolation": "bicubic", "resize_mode": "shortest"}


def load_trunk_clip(model_dir: Path, config: dict):
    """(model, preprocess, tokenizer) of a saved `TrunkCLIP` folder, as open_clip returns them."""
    from open_clip.tokenizer import HFTokenizer
    from open_clip.transform import image_transform
    from safetensors.torch import load_file

    cfg = config["model_cfg"]
    here = str(model_dir.resolve())
    cfg = {**cfg, "text_cfg": {**cfg["text_cfg"], "hf_model_name": here, "hf_tokenizer_name": here}}
    # the trunk runs on the threads torch has here (a stage's or worker's setting)
    model = TrunkCLIP(cfg, text_pretrained=False, threads=torch.get_num_threads())
    model.load_state_dict(load_file(str(model_dir / "open_clip_model.safetensors")), strict=True)
    model.eval()
    pre = config["preprocess_cfg"]
    preprocess = image_transform(pre["size"], is_train=False, mean=tuple(pre["mean"]), std=tuple(pre["std"]),
                                 resize_mode=pre["resize_mode"], interpolation=pre["interpolation"])
    tokenizer = HFTokenizer(here, context_length=cfg["text_cfg"]["context_length"])
    return model, preprocess, tokenizer
