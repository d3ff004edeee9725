"""CLIPN's "no" text tower (Wang et al., ICCV 2023; xmed-lab/CLIPN), built on top of an open_clip CLIP.

CLIPN keeps CLIP's image encoder and text tower ("yes") frozen and trains a second text tower that
reads a prompt as "this is NOT a photo of …": a copy of the text transformer with its own weights,
stored in the checkpoint under `*_no` names, plus 16 learnable "no" prompts (`prompt_no`,
shape (16, context_length, width)) added to the token embeddings. At inference CLIPN adds the mean of
the 16 prompts:

    x = token_embedding_no(t) + positional_embedding_no + mean_k prompt_no[k]     # (B, L, W)
    x = ln_final_no(transformer_no(x, causal mask))[argmax-token] @ text_projection_no

This module reads those weights from a CLIPN checkpoint (`{"state_dict": …}` or a bare state dict,
optionally with DataParallel's `module.` prefix; .pt/.pth via torch.load or .safetensors) and builds
that tower from copies of the open_clip model's own text modules, so the layer types (and QuickGELU
for OpenAI weights) always match the base CLIP. The CLIP passed in must be the one CLIPN was trained
from (its image encoder and yes-tower are frozen copies of it; CLIPN's released weights sit on
OpenAI's ViT-B/16): a different architecture fails on shapes, different weights of the same
architecture are reported by `base_matches` (a warning and `clipn_base_match` in the metrics).

The `models@clipn` stage (params `models.clipn`) writes `models/clipn/`: the base CLIP bundle in
`base/` (`pas.models.clip` format), the checkpoint file as downloaded or copied (sha256 checked) and
`clipn.json` naming it; with `kind: none` (the offline default) only `clipn.json` saying so, and `ood`
keeps `models/clip`. `read_clipn_dir` is what `ood` reads.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlparse

import numpy as np

from pas.hashing import sha256_file
from pas.jsonio import write_json
from pas.params import ParamsError

log = logging.getLogger(__name__)

MANIFEST = "clipn.json"     # in models/clipn/: {"kind": "none"} or {"kind": "clipn", "checkpoint": file, …}
BASE_DIR = "base"           # the base CLIP bundle inside models/clipn/
SUFFIXES = (".pt", ".pth", ".safetensors")


def read_state_dict(path: str | Path) -> dict:
    """Tensors of a checkpoint file, with `state_dict` unwrapped and `module.` prefixes removed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CLIPN checkpoint not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(path))
    else:
        import torch

        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, Mapping) and isinstance(sd.get("state_dict"), Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: not a state dict (got {type(sd).__name__})")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def has_no_tower(state_dict: Mapping[str, Any]) -> bool:
    return "prompt_no" in state_dict and any(k.startswith("transformer_no.") for k in state_dict)


def _no_tower_class():
    import torch
    from torch import nn

    class ClipnNoTower(nn.Module):
        """The "no" text encoder: `forward(tokens (B, L) int64) -> (B, D)` unnormalised."""

        def __init__(self, clip_model: Any, prompt_no: torch.Tensor):
            super().__init__()
            proj = clip_model.text_projection
            if not isinstance(proj, torch.Tensor):
                raise ValueError("CLIPN needs a CLIP whose text_projection is a matrix (open_clip "
                                 f"text_cfg proj_type 'linear' gives {type(proj).__name__})")
            self.transformer_no = copy.deepcopy(clip_model.transformer)
            self.token_embedding_no = copy.deepcopy(clip_model.token_embedding)
            self.ln_final_no = copy.deepcopy(clip_model.ln_final)
            self.positional_embedding_no = nn.Parameter(clip_model.positional_embedding.detach().clone())
            self.text_projection_no = nn.Parameter(proj.detach().clone())
            self.prompt_no = nn.Parameter(prompt_no.detach().clone())
            self.register_buffer("attn_mask", clip_model.attn_mask, persistent=False)
            self.pool_type = getattr(clip_model, "text_pool_type", "argmax")
            self.eos_id = getattr(clip_model, "text_eos_id", None)

        def forward(self, text: torch.Tensor) -> torch.Tensor:
            from open_clip.transformer import text_global_pool

            cast = self.transformer_no.get_cast_dtype()
            x = self.token_embedding_no(text).to(cast)                       # (B, L, W)
            x = x + self.positional_embedding_no.to(cast)
            x = x + self.prompt_no.mean(dim=0, keepdim=True).to(cast)        # mean of the learned no-prompts
            x = self.transformer_no(x, attn_mask=self.attn_mask)
            x = self.ln_final_no(x)
            x = text_global_pool(x, text, self.pool_type, eos_token_id=self.eos_id)  # EOT token
            return x @ self.text_projection_no                               # (B, D)

    return ClipnNoTower


def build_no_tower(clip_model: Any, state_dict: Mapping[str, Any]):
    """A `ClipnNoTower` for `clip_model` (open_clip CLIP) with the `*_no` weights of `state_dict`.

    Raises ValueError naming the missing keys or mismatched shapes; a checkpoint without a no-tower
    (a plain CLIP) is refused, so the caller falls back to negative prompts deliberately.
    """
    if not has_no_tower(state_dict):
        raise ValueError("not a CLIPN checkpoint: no prompt_no / transformer_no.* weights")
    tower = _no_tower_class()(clip_model, state_dict["prompt_no"])
    expected = tower.state_dict()
    missing = sorted(k for k in expected if k not in state_dict)
    if missing:
        raise ValueError(f"CLIPN checkpoint lacks {len(missing)} no-tower weights, e.g. {missing[:3]} "
                         "(was it trained on a different CLIP architecture than its base?)")
    bad = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
           for k, v in expected.items() if tuple(state_dict[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError(f"CLIPN no-tower shapes differ from the base CLIP's: {bad[:3]}")
    tower.load_state_dict({k: state_dict[k] for k in expected}, strict=True)
    return tower.eval()


def base_matches(clip_model: Any, state_dict: Mapping[str, Any]) -> bool | None:
    """Whether the checkpoint's frozen "yes" text projection equals the loaded CLIP's (None if the
    checkpoint does not carry it). CLIPN's no-tower is only meaningful with the CLIP it was trained on."""
    import torch

    ref = state_dict.get("text_projection")
    proj = getattr(clip_model, "text_projection", None)
    if ref is None or not isinstance(proj, torch.Tensor):
        return None
    return tuple(ref.shape) == tuple(proj.shape) and bool(torch.allclose(ref.float(), proj.float().cpu(),
                                                                         atol=1e-4))


class NoTextEncoder:
    """`encode_texts(strs)` through CLIPN's no-tower, L2-normalised float32 (mirrors `Clip.encode_texts`)."""

    def __init__(self, tower: Any, tokenizer: Any, device: str = "cpu", base_match: bool | None = None):
        self.tower = tower.to(device)
        self.tokenizer = tokenizer
        self.device = device
        self.base_match = base_match     # see `base_matches`

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                tok = self.tokenizer(list(texts[i:i + batch_size])).to(self.device)
                out.append(F.normalize(self.tower(tok), dim=-1).float().cpu().numpy())
        dim = int(self.tower.text_projection_no.shape[1])
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, dim), np.float32)


def load_clipn_no_encoder(path: str | Path, clip: Any) -> NoTextEncoder:
    """Read a CLIPN checkpoint and return the no-text encoder on top of `clip` (a `pas.models.clip.Clip`)."""
    sd = read_state_dict(path)
    tower = build_no_tower(clip.model, sd)
    match = base_matches(clip.model, sd)
    if match is False:
        log.warning("%s: CLIPN was trained on a different CLIP than the one loaded (text_projection "
                    "differs); its no-logits will not be calibrated", path)
    return NoTextEncoder(tower, clip.tokenizer, getattr(clip, "device", "cpu"), base_match=match)


# ------------------------------------------------------------------------ the models/clipn folder

def write_not_configured(out_dir: str | Path) -> Path:
    """`models.clipn: {kind: none}`: a folder that only says so (the ood stage depends on models/clipn
    whatever the profile, as dvc.yaml deps cannot be conditional)."""
    out = Path(out_dir)
    write_json(out / MANIFEST, {"kind": "none"})
    return out


def fetch_checkpoint(ck: Mapping[str, str], out_dir: str | Path, where: str = "models.clipn.checkpoint") -> Path:
    """Download (`url`) or copy (`path`) a CLIPN checkpoint into `out_dir`, check its sha256 (required
    with `url`), check that its no-tower loads onto the base CLIP already in `out_dir/base`, and write
    the manifest. Errors are one line naming `where`."""
    import shutil

    out = Path(out_dir)
    src = ck.get("url") or ck.get("path")
    suffix = Path(urlparse(src).path if "url" in ck else src).suffix.lower()
    dst = out / ("checkpoint" + (suffix if suffix in SUFFIXES else ".pt"))   # read_state_dict goes by suffix
    if "url" in ck:
        import torch

        try:
            torch.hub.download_url_to_file(src, str(dst), progress=False)
        except Exception as e:  # noqa: BLE001 - urllib/http errors of many types: one line with the key
            raise ParamsError(f"{where}.url={src!r}: download failed: {e}") from None
    else:
        path = Path(src).expanduser()
        if not path.is_file():
            raise ParamsError(f"{where}.path={src!r}: no such file")
        shutil.copyfile(path, dst)
    digest = sha256_file(dst)
    want = ck.get("sha256")
    if want and digest != want.lower():
        dst.unlink()
        raise ParamsError(f"{where}.sha256: {src} has sha256 {digest}, expected {want.lower()}")
    from pas.models.clip import load_clip

    try:    # a checkpoint that does not fit the base fails here, not hours later in ood
        enc = load_clipn_no_encoder(dst, load_clip(out / BASE_DIR))
    except ValueError as e:
        raise ParamsError(f"{where}: {e}") from None
    write_json(out / MANIFEST, {"kind": "clipn", "checkpoint": dst.name, "source": src, "sha256": digest,
                                "base_match": enc.base_match})
    return out


def read_clipn_dir(model_dir: str | Path) -> tuple[Path, Path] | None:
    """(base CLIP folder, checkpoint file) of a `models/clipn` folder, or None for `kind: none`."""
    model_dir = Path(model_dir)
    manifest = model_dir / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"{model_dir}: not a CLIPN model folder (no {MANIFEST}); run `dvc repro models@clipn`")
    import json

    m = json.loads(manifest.read_text())
    if m.get("kind") == "none":
        return None
    return model_dir / BASE_DIR, model_dir / m["checkpoint"]
