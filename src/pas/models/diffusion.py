"""Text-to-image model S_I (paper §3.2): a diffusers StableDiffusionPipeline in a local folder.

The `models` stage writes `models/diffusion/` either by downloading the files `sd_files(variant)` of
a real checkpoint once (pas.models.specs + pas.models.hub, e.g. SD 2.1 as in the paper) or by building
a tiny seeded random-init pipeline of the same architecture (`build_tiny_sd`, offline smoke profile:
64 px, 8× VAE, ~1M-param UNet).
Every later stage loads it with `load_pipeline(dir, device, dtype)`, the same code path for both.

No torch/diffusers import at module level (params validation may import this module).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from pas.jsonio import write_json
from pas.models.files import fingerprint_dir, seed_everything

MODEL_INDEX = "model_index.json"
SOURCE_FILE = "pas_model.json"

# scheduler name (params `diffusion.scheduler`) -> diffusers class name
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
}
DTYPES = ("auto", "float32", "float16", "bfloat16")   # auto: float16 on CUDA, float32 elsewhere

# Tiny architecture of the offline profile: same classes as SD, sizes cut down to run on 2 CPU cores.
TINY_RESOLUTION = 64
TINY_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                 bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
TINY_UNET = dict(sample_size=TINY_RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=1,
                 block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                 attention_head_dim=8, norm_num_groups=8)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                block_out_channels=(16, 32, 32, 32), norm_num_groups=8, sample_size=TINY_RESOLUTION,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
# SD's training noise schedule (scaled-linear betas), as in SD 1.x/2.x scheduler_config.json
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                   beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                   steps_offset=1, prediction_type="epsilon")


def clip_bpe_vocab() -> tuple[dict[str, int], list[str]]:
    """OpenAI CLIP's BPE vocabulary (49,408 tokens) and merge list, rebuilt offline from the BPE
    merges file bundled with open_clip (the same construction as its SimpleTokenizer)."""
    import gzip

    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe(), "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]          # first line is a version header
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_clip_tokenizer(out_dir: str | Path, model_max_length: int = 77) -> Path:
    """A transformers CLIPTokenizer folder (vocab.json, merges.txt, configs), written offline."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe_vocab()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, sort_keys=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    write_json(out / "special_tokens_map.json", special)
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, **special,
        "do_lower_case": True, "clean_up_tokenization_spaces": True})
    return out


def build_tiny_sd(out_dir: str | Path, seed: int = 0) -> Path:
    """Seeded random-init tiny StableDiffusionPipeline folder (UNet2DConditionModel, 8× AutoencoderKL
    at 64 px, CLIPTextModel, CLIP BPE tokenizer, DDIM scheduler, no safety checker).

    Same seed → byte-identical files (safetensors weights, sorted JSON configs).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = write_clip_tokenizer(out / "tokenizer")
    tokenizer = CLIPTokenizer(vocab=str(tok_dir / "vocab.json"), merges=str(tok_dir / "merges.txt"))
    seed_everything(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
    seed_everything(seed + 1)
    unet = UNet2DConditionModel(**TINY_UNET)
    seed_everything(seed + 2)
    vae = AutoencoderKL(**TINY_VAE)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SD_SCHEDULE), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    # our own tokenizer files are the reference: rewrite them (save_pretrained's are equivalent
    # but may carry library-version details)
    write_clip_tokenizer(out / "tokenizer")
    write_json(out / SOURCE_FILE, {"kind": "tiny", "seed": seed, "resolution": TINY_RESOLUTION})
    return out


def sd_files(variant: str | None = None) -> list[str]:
    """The files of a diffusers SD repo that `load_pipeline` needs (safetensors only; no safety
    checker, no feature extractor). `variant="fp16"` picks the half-precision weight files."""
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    return [MODEL_INDEX,
            "scheduler/scheduler_config.json",
            "tokenizer/vocab.json", "tokenizer/merges.txt",
            "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json",
            "text_encoder/config.json", f"text_encoder/model{suffix}",
            "unet/config.json", f"unet/diffusion_pytorch_model{suffix}",
            "vae/config.json", f"vae/diffusion_pytorch_model{suffix}"]


REQUIRED = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
            "tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json")


def check_sd_dir(model_dir: str | Path) -> Path:
    """Raise FileNotFoundError naming the first missing file of a diffusers SD folder."""
    model_dir = Path(model_dir)
    for rel in REQUIRED:
        if not (model_dir / rel).is_file():
            raise FileNotFoundError(f"{model_dir}: not a diffusion model folder (missing {rel}); "
                                    "run `dvc repro models`")
    return model_dir


def _variant(model_dir: Path) -> str | None:
    for v in ("fp16", "bf16"):
        if (model_dir / "unet" / f"diffusion_pytorch_model.{v}.safetensors").is_file() and not \
                (model_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file():
            return v
    return None


def fingerprint(model_dir: str | Path) -> str:
    """Content hash of the weights and configs: identifies the model in shard fingerprints."""
    return fingerprint_dir(model_dir, suffixes=(".safetensors", ".json", ".txt"))


def resolve_dtype(dtype: str, device: str) -> str:
    """`auto` → float16 on CUDA (SD 2.1's fp16 weights, half the memory), float32 elsewhere (CPU)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} must be one of {list(DTYPES)}")
    if dtype == "auto":
        return "float16" if str(device).startswith("cuda") else "float32"
    return dtype


def load_pipeline(model_dir: str | Path, device: str = "cpu", dtype: str = "float32",
                  scheduler: str | None = None, vae_slicing: bool = False, vae_tiling: bool = False):
    """Load a StableDiffusionPipeline folder (tiny or real) onto `device` in `dtype` (`auto`: float16
    on CUDA); optionally swap its scheduler (`ddim`, `pndm`, `euler`, `euler_a`, `dpm`, `lms`) keeping
    the trained noise schedule. `vae_slicing` / `vae_tiling`: the VAE decodes one image / one tile at
    a time, which bounds its memory at 768² with large batches."""
    import diffusers
    import torch
    from diffusers import StableDiffusionPipeline

    dtype = resolve_dtype(dtype, device)
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler={scheduler!r} must be one of {sorted(SCHEDULERS)}")
    model_dir = check_sd_dir(model_dir)
    with warnings.catch_warnings():  # newer diffusers renamed torch_dtype → dtype; older lack dtype
        warnings.simplefilter("ignore", FutureWarning)
        pipe = StableDiffusionPipeline.from_pretrained(
            str(model_dir), torch_dtype=getattr(torch, dtype), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False, local_files_only=True,
            variant=_variant(model_dir))
    if scheduler is not None:
        cls = getattr(diffusers, SCHEDULERS[scheduler])
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    if vae_slicing:
        pipe.vae.enable_slicing()
    if vae_tiling:
        pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
