"""The rehearsal of issue 16: `cp configs/paper-food.yaml params.yaml && dvc repro` gets through every stage.

A temporary copy of the repository runs `dvc repro` on a copy of configs/paper-food.yaml in which only
sizes are scaled down (concept caps, k_retrieve, n_cap, n_synth, k_dup/k_leak, diffusion steps and
resolution, epochs, batch and head sizes, the CLIP architectures ViT-L-14 (models.clip) and ViT-B-16
(CLIPN's base) → ViT-B-32 with the same `pretrained: openai` tag), locations point at the stand-ins
(pool folder, eval-set root, the kNN service URL, the SSCD and CLIPN file URLs: the preset's CLIPN
checkpoint is a path, as its weights have no stable URL; here it is served by URL with its sha256) and
devices are the CPU (device: cpu, dtype: auto). Every model kind
(hub, url, open_clip pretrained), backend (vllm, clip_service), role and container wrapper of the
preset stays as it is, and dvc.yaml is the repository's, whatever stages it has. Served on 127.0.0.1:

- the Hugging Face Hub (tests/standins/hub.py): the SD 2.1 mirror at the preset's pinned revision
  with fp16 variant files, gated Mixtral-8x7B-Instruct and Llama-2-13b-chat (HF_TOKEN accepted),
  all-MiniLM-L6-v2, and the timm/..._clip_224.openai repository open_clip downloads `openai` weights from;
- the SSCD TorchScript URL (a stand-in descriptor with SSCD's interface, tests/standins/repos.py);
- a CLIPN checkpoint URL (a no-tower fitting the stand-in ViT-B-32 openai weights, tests/standins/repos.py);
- a clip-retrieval kNN service and the image URLs it returns (tests/standins/knn_service.py);
- vLLM (tests/standins/site/vllm), installed only in the fake llm image: every GPU stage runs through
  `stages/run-in <family>` into tests/fake_apptainer.py (PAS_CONTAINERS=1), on 2 simulated 80 GiB GPUs.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file

from pas.hashing import sha256_file

from tests.dvc_helpers import REPO, make_repo, ran_stages, run
from tests.standins.fixtures import file_server, llm_repos, standin_repos  # noqa: F401  (fixtures)
from tests.standins.hub import HubStandIn
from tests.standins.knn_service import KnnService
from tests.standins.repos import write_clipn_checkpoint, write_open_clip_repo, write_sscd_torchscript

CLIPART = Path("/usr/share/openclipart/png")
FAKE = Path(__file__).resolve().parent / "fake_apptainer.py"
SITE = Path(__file__).resolve().parent / "standins" / "site"
TOKEN = "hf_rehearsal_token_with_both_licences"
CLIP_ARCH, CLIP_REPO = "ViT-B-32", "timm/vit_base_patch32_clip_224.openai"   # open_clip's hf_hub for the tag


def clipart(folder: str, n: int, skip: int = 0) -> list[Path]:
    """n small PNGs of an openclipart folder (the big ones are 100+ megapixel posters)."""
    files = [p for p in sorted((CLIPART / folder).rglob("*.png")) if p.stat().st_size < 120_000]
    assert len(files) >= skip + n, folder
    return files[skip:skip + n]


def jpeg(src: Path, side: int = 160) -> bytes:
    im = Image.open(src).convert("RGB")
    im.thumbnail((side, side))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def subject(p: Path) -> str:
    """openclipart names files <subject>_<author>_<nn>.png: the subject's words are the alt text."""
    return " ".join(p.stem.split("_")[:-2] or [p.stem]).replace("-", " ").lower()


def write_evalsets(root: Path) -> None:
    """Food-101, FoodX-251 and Food-2K in their released layouts, two classes each, from clipart."""
    def put(path: Path, src: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg(src, 128))

    a, b = clipart("food/fruit", 9, skip=40), clipart("food/desserts", 9, skip=40)
    f101 = root / "food-101"
    for cls, files in (("apple_pie", a[:3]), ("baklava", b[:3])):
        for i, src in enumerate(files):
            put(f101 / "images" / cls / f"{i}.jpg", src)
    (f101 / "meta").mkdir(parents=True)
    (f101 / "meta" / "train.txt").write_text("apple_pie/0\napple_pie/1\nbaklava/0\nbaklava/1\n")
    (f101 / "meta" / "test.txt").write_text("apple_pie/2\nbaklava/2\n")
    fx = root / "foodx251"
    train, val = [], []
    for c, files in enumerate((a[3:6], b[3:6])):
        for i, src in enumerate(files):
            name = f"{'val' if i == 2 else 'train'}_{c}{i:05d}.jpg"
            put(fx / ("val_set" if i == 2 else "train_set") / name, src)
            (val if i == 2 else train).append(f"{name},{c}")
    (fx / "annot").mkdir(parents=True)
    (fx / "annot" / "train_info.csv").write_text("\n".join(train) + "\n")
    (fx / "annot" / "val_info.csv").write_text("\n".join(val) + "\n")
    (fx / "annot" / "class_list.txt").write_text("0 apple_pie\n1 baklava\n")
    f2k = root / "Food2k_complete"
    train, test = [], []
    for c, files in enumerate((a[6:9], b[6:9])):
        for i, src in enumerate(files):
            put(f2k / str(c) / f"{i}.jpg", src)
            (test if i == 0 else train).append(f"/{c}/{i}.jpg {c}")
    (f2k / "meta_data").mkdir(parents=True)
    (f2k / "meta_data" / "train_finetune.txt").write_text("\n".join(train) + "\n")
    (f2k / "meta_data" / "test_finetune.txt").write_text("\n".join(test) + "\n")
    (f2k / "food2k_label2name_en.txt").write_text("0000--Apple pie\n0001--Baklava\n")


def scaled(preset: dict, where: dict) -> dict:
    """The preset with sizes scaled down and locations/devices pointed here; nothing else changes."""
    p = json.loads(json.dumps(preset))
    # sizes
    p.update(k_retrieve=3, n_cap=1, n_synth=1, k_dup=8, k_leak=4)
    p["concepts"].update(max_generation_samples=2, generation_batch=2, max_expansion_rounds=1, max_concepts=10)
    p["models"]["clip"]["name"] = CLIP_ARCH                        # ViT-L-14: same kind and tag, 3x smaller
    p["models"]["clipn"]["base"]["name"] = CLIP_ARCH               # ViT-B-16: same kind and tag
    p["models"]["backbone_init"]["kwargs"]["img_size"] = 32
    p["diffusion"].update(steps=2, resolution=64)                  # the tiny SD of the stand-in Hub is 64 px
    p["pretrain"].update(epochs=1, warmup_epochs=0, batch_size=4, image_size=32, hidden_dim=64,
                         pred_hidden_dim=64, out_dim=32, num_workers=0)
    p["eval"]["linear_epochs"] = 2
    # locations
    p["pool"]["source"] = where["pool"]
    p["eval"]["root"] = where["evalsets"]
    p["retrieve"]["service"]["url"] = where["knn"]
    p["models"]["sscd"]["url"] = where["sscd"]
    p["models"]["clipn"]["checkpoint"] = where["clipn"]            # a path on the cluster: {url, sha256} here
    # devices: no GPU here (auto: float16 on CUDA, float32 on the CPU)
    for section in ("pool", "diffusion", "ood", "pretrain", "eval"):
        p[section]["device"] = "cpu"
    p["diffusion"]["dtype"] = "auto"
    return p


def unchanged_parts(p: dict) -> dict:
    """What the rehearsal must not touch: model kinds/sources, LLM backends and roles, retrieval backend."""
    models = {k: {kk: vv for kk, vv in v.items() if kk not in ("name", "url", "kwargs", "checkpoint")}
              if "kind" in v else v for k, v in p["models"].items()}
    models["clipn"]["base"] = {k: v for k, v in models["clipn"]["base"].items() if k != "name"}
    roles = {r: {k: s[k] for k in ("backend", "model", "dtype") if k in s} | {"tp": s.get("tensor_parallel_size")}
             for r, s in p["llm"].items()}
    return {"models": models, "llm": roles, "retrieve": p["retrieve"]["backend"],
            "indice": p["retrieve"]["service"]["indice_name"], "validator": p["concepts"]["validator"],
            "coverage": p["concepts"]["coverage_embedder"], "lambdas": [p[k] for k in sorted(p) if k.startswith("lambda")],
            "sets": [(s["name"], s["kind"], s["path"]) for s in p["eval"]["sets"]]}


def image_site(repo: Path, family: str) -> list[str]:
    """The packages a fake image has beyond the host's: vLLM (the stand-in) iff its .def builds on the
    vLLM image, as on the cluster (the NGC-based diffusion and vision images have none)."""
    base = next(ln for ln in (repo / "containers" / f"{family}.def").read_text().splitlines() if ln.startswith("From:"))
    return [str(SITE)] if "vllm/vllm-openai" in base else []


def timed_repro(repo: Path, env: dict) -> tuple[subprocess.CompletedProcess, dict[str, float]]:
    """`dvc repro --keep-going` (stages that do not need a failed one still run), with each stage's
    wall time from when DVC announces it to the next announcement."""
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1",
         "DVC_NO_ANALYTICS": "1", **env}
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e['PATH']}"
    proc = subprocess.Popen(["dvc", "repro", "--keep-going"], cwd=repo, env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines, times, current, t = [], {}, None, time.time()
    for line in proc.stdout:
        lines.append(line)
        if line.strip().startswith("Running stage '"):
            now = time.time()
            if current:
                times[current] = now - t
            current, t = line.split("'")[1], now
    proc.wait()
    if current:
        times[current] = time.time() - t
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(lines), ""), times


@pytest.mark.slow
def test_paper_food_preset_gets_through_every_stage(tmp_path, standin_repos, file_server):
    if not CLIPART.is_dir():
        pytest.fail("openclipart-png is not installed: apt-get install openclipart-png")
    t0 = time.time()
    preset = yaml.safe_load((REPO / "configs" / "paper-food.yaml").read_text())
    sd = preset["models"]["diffusion"]
    llms = {name: spec["repo"] for name, spec in preset["models"]["llm"].items()}

    # the world outside: images, eval sets, model files
    pool = tmp_path / "pool"
    for folder, n in (("food/fruit", 12), ("food/breads_and_carbs", 6), ("animals", 6)):
        for src in clipart(folder, n):
            dst = pool / folder.replace("/", "_") / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    web = {f"{i:03d}.jpg": (jpeg(src), subject(src)) for i, src in enumerate(
        clipart("food/fruit", 14, skip=12) + clipart("food/desserts", 14) + clipart("animals", 6, skip=6))}
    write_evalsets(tmp_path / "evalsets")
    sscd_root, sscd_url = file_server
    write_sscd_torchscript(sscd_root / "sscd_disc_mixup.torchscript.pt")
    write_open_clip_repo(tmp_path / "open_clip_repo", CLIP_ARCH)
    write_clipn_checkpoint(sscd_root / "clipn_vit_b32.pt",
                           load_file(str(tmp_path / "open_clip_repo" / "open_clip_model.safetensors")))
    clipn = {"url": f"{sscd_url}/clipn_vit_b32.pt", "sha256": sha256_file(sscd_root / "clipn_vit_b32.pt")}

    with HubStandIn() as hub, KnnService(web, preset["retrieve"]["service"]["indice_name"]) as knn:
        hub.add_repo(sd["repo"], standin_repos["sd"], sha=sd["revision"])
        for name, repo in llms.items():
            hub.add_repo(repo, standin_repos["mixtral" if "mixtral" in repo.lower() else "llama2"], gated=True,
                         allowed_tokens=(TOKEN,))
        hub.add_repo(preset["models"]["text_embed"]["repo"], standin_repos["minilm"])
        hub.add_repo(CLIP_REPO, tmp_path / "open_clip_repo")

        params = scaled(preset, {"pool": str(pool), "evalsets": str(tmp_path / "evalsets"),
                                 "knn": f"{knn.url}/knn-service",
                                 "sscd": f"{sscd_url}/sscd_disc_mixup.torchscript.pt", "clipn": clipn})
        assert unchanged_parts(params) == unchanged_parts(preset)
        repo = make_repo(tmp_path / "repo")
        shutil.copy2(REPO / "configs" / "paper-food.yaml", repo / "params.yaml")   # cp configs/paper-food.yaml …
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))  # … with sizes scaled
        # the containers: every family's image "built", with vLLM where its .def's base image has it
        for family in ("llm", "diffusion", "vision"):
            (repo / "containers" / f"{family}.sif").write_text(json.dumps({"site": image_site(repo, family)}))
        bin_ = tmp_path / "bin"
        bin_.mkdir()
        (bin_ / "apptainer").write_text(f"#!{sys.executable}\n" + FAKE.read_text())
        (bin_ / "apptainer").chmod(0o755)
        env = {**hub.env(tmp_path / "hf-home"), "HF_TOKEN": TOKEN, "TRANSFORMERS_OFFLINE": "0",
               "PAS_CONTAINERS": "1", "FAKE_APPTAINER_LOG": str(tmp_path / "apptainer.jsonl"),
               "PATH": f"{bin_}{os.pathsep}{os.environ['PATH']}", "VLLM_STANDIN_GPUS": "2",
               "VLLM_STANDIN_GPU_GIB": "80", "TORCH_HOME": str(tmp_path / "torch-home")}
        t_setup = time.time() - t0
        out, times = timed_repro(repo, env)
        t_repro = time.time() - t0 - t_setup
    print(f"rehearsal: set-up {t_setup:.0f} s, dvc repro {t_repro:.0f} s; per stage: "
          + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))

    dvc = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    stages = [f"{n}@{k}" for n, s in dvc.items() if "foreach" in s for k in s["foreach"]]
    stages += [n for n, s in dvc.items() if "foreach" not in s]
    # each GPU stage ran through its container
    calls = [json.loads(x) for x in (tmp_path / "apptainer.jsonl").read_text().splitlines()]
    images = sorted({Path(next(a for a in c if a.endswith(".sif"))).stem for c in calls if c[0] == "exec"})
    assert images == ["diffusion", "llm", "vision"], out.stdout[-3000:]

    # the models: the fp16 files of the pinned mirror, no hub bookkeeping in any DVC out, the gated
    # LLMs with the token, no pickled duplicates
    assert not list((repo / "models").rglob(".cache"))
    sd_files = [p.rsplit("/", 1)[-1] for p in hub.file_requests(sd["repo"])]
    assert sd_files and all(f.endswith((".json", ".txt", ".fp16.safetensors")) for f in sd_files), sd_files
    assert json.loads((repo / "models/diffusion/pas_model.json").read_text())["commit"] == sd["revision"]
    for name, repo_id in llms.items():
        got = [p.rsplit("/", 1)[-1] for p in hub.file_requests(repo_id)]
        assert "config.json" in got and not any(f.endswith((".pt", ".bin")) for f in got), got
        assert all(tok == TOKEN for m, path, tok in hub.requests if path.startswith(f"/{repo_id}/resolve/"))
        assert (repo / "models" / "llm" / name / "tokenizer.json").is_file()
    assert any(CLIP_REPO in path for _, path, _ in hub.requests)          # open_clip's `openai` weights
    asked = {path.split("/resolve/")[0].strip("/") for _, path, _ in hub.requests if "/resolve/" in path}
    assert asked == {sd["repo"], *llms.values(), preset["models"]["text_embed"]["repo"], CLIP_REPO}, asked
    # concepts by the LLM roles, real images from the kNN service
    concepts = json.loads((repo / "metrics/concepts.json").read_text())
    assert concepts["B_after_validation"] > 0
    assert knn.requests and all(r["indice_name"] == "laion5B-L-14" for r in knn.requests) and knn.hits
    assert out.returncode == 0, out.stdout[-4000:]
    # every stage of dvc.yaml ran (foreach stages expanded), and nothing is left to run
    assert sorted(ran_stages(out.stdout)) == sorted(stages), out.stdout[-3000:]
    assert "Data and pipelines are up to date" in run(["dvc", "status"], repo, env=env).stdout
    funnel = json.loads((repo / "metrics/dataset.json").read_text())
    assert funnel["retrieve"]["n"] > 0 and funnel["generate"]["n"] > 0 and funnel["prune"]["n"] > 0
    # ood scored with CLIPN on its own base, retrieval kept models/clip
    ood = json.loads((repo / "metrics/ood.json").read_text())
    assert ood["mode"] == "clipn" and ood["clipn_base_match"] is True, ood
    assert json.loads((repo / "models/clipn/clipn.json").read_text())["sha256"] == clipn["sha256"]
    ev = json.loads((repo / "metrics/eval.json").read_text())
    assert sorted(ev["sets"]) == ["food101", "foodx251"]                  # Food-2K: leakage only

