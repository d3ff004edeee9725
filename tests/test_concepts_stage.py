"""`stages/concepts.py` end to end: with a scripted chat-completions server on 127.0.0.1 (fast, LLM
validator through log-probs), with the real offline SmolLM2 + MiniLM (slow), and under `dvc repro` (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import yaml

import pas.params as P
from pas.concepts import load_bank
from tests.test_llm_openai import Server

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "stages"))

GEN = ["1. Paella\n2. Risotto\n3. Ramen", "Sure! Here they are:\n- paella\n- Pad Thai\n- Hammer", "paella, ramen"]
EXPAND = {"paella": "1. Seafood paella\n2. Arroz negro", "risotto": "Risotto alla milanese",
          "ramen": "1. Tonkotsu ramen\n2. Shoyu ramen", "pad thai": "I'm sorry, I can't.",
          "hammer": "1. Sledgehammer"}


def test_load_bank_reads_accepted_concepts_whatever_the_row_order(tmp_path):
    from pas.io.manifest import write_parquet

    df = pd.DataFrame({"concept": ["pizza", " sushi ", "pizza", "bad", "", None],
                       "accepted": [True, True, True, False, True, True]})
    write_parquet(df, tmp_path / "bank.parquet", sort_by=None)
    assert load_bank(tmp_path / "bank.parquet") == ["pizza", "sushi"]
    write_parquet(df.iloc[::-1], tmp_path / "reversed.parquet", sort_by=None)
    assert load_bank(tmp_path / "reversed.parquet") == ["pizza", "sushi"]
    with pytest.raises(FileNotFoundError, match="concept bank not found"):
        load_bank(tmp_path / "nope.parquet")
    write_parquet(df[["concept"]], tmp_path / "old.parquet", sort_by=None)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['accepted'\]"):
        load_bank(tmp_path / "old.parquet")


class ScriptedServer(Server):
    """Chat completions: generation answers by call order, expansion by concept, yes/no by a rule."""

    def __init__(self):
        self.n_gen = 0
        super().__init__()

    def answer(self, body):
        last = body["messages"][-1]["content"]
        if body.get("logprobs"):  # validation: everything but hammers is food
            yes = -0.05 if "hammer" not in last else -3.0
            top = [{"token": "Yes", "logprob": yes}, {"token": "No", "logprob": -3.0 if yes > -1 else -0.05}]
            return {"choices": [{"message": {"content": "Yes"}, "logprobs": {"content": [{"top_logprobs": top}]}}]}
        if "similar to" in last:
            concept = last.split('similar to "', 1)[1].split('"', 1)[0]
            text = EXPAND.get(concept, "")
        else:
            with self.lock:
                self.n_gen += 1
                k = self.n_gen
            text = GEN[k - 1] if k <= len(GEN) else "paella"
        return {"choices": [{"message": {"content": text}, "finish_reason": "stop"}]}


@pytest.fixture
def server():
    s = ScriptedServer()
    yield s
    s.close()


def write_params(path: Path, url: str, **concepts):
    spec = {"backend": "openai", "model": "scripted", "base_url": url, "retries": 0, "timeout": 10, "batch_size": 1}
    c = {"max_generation_samples": 10, "generation_batch": 1, "max_expansion_rounds": 3, "validator": "llm",
         "validator_threshold": 0.5, "references": []}
    c.update(concepts)
    params = {"lambda_1": 0.3, "lambda_2": 0.3, "seed": 0, "domain": {"name": "food", "description": "dishes"},
              "llm": {"l1": spec, "l2": spec, "l3": spec, "l4": spec}, "concepts": c}
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def test_stage_with_scripted_server(tmp_path, server):
    import concepts as stage

    write_params(tmp_path / "params.yaml", server.url)
    out, met = tmp_path / "data" / "concepts", tmp_path / "metrics" / "concepts.json"
    m = stage.main(["--params", str(tmp_path / "params.yaml"), "--out", str(out), "--metrics", str(met),
                    "--no-progress"])
    # L1: n=1 {paella, risotto, ramen}; n=2 +{pad thai, hammer}: 2 < 0.3·3? no; n=3 +0 < 1.5 → stop, B0 = 5
    # L2 round 1: +seafood paella, arroz negro, risotto alla milanese, tonkotsu/shoyu ramen, sledgehammer = 6
    #   (6 < 1.5? no); round 2: only old concepts answer again, the 6 new ones get "" → +0 < 3.3 → stop
    assert m["B0"] == 5 and m["B_before_validation"] == 11 and m["B_after_validation"] == 9
    assert m["generation_samples"] == m["generation_drawn"] == 3
    assert m["generation_stop"] == "lambda_1" and m["expansion_stop"] == "lambda_2" and m["expansion_rounds"] == 2
    assert m["stopped_by_cap"] == []
    assert m["answers"]["expand_refusal"] == 2  # pad thai refuses in both rounds
    # the server reports no context length (no GET /v1/models): the whole L1 conversation is history
    assert m["history_samples_kept"] == [3, 3] and m["history_samples_dropped"] == [0, 0]
    assert m["history_context_tokens"] is None
    bank = pd.read_parquet(out / "bank.parquet")
    assert bank["concept"].tolist() == sorted(bank["concept"])
    row = bank.set_index("concept").loc["sledgehammer"]
    assert row["origin"] == "hammer" and row["first_iteration"] == 1 and not row["accepted"]
    assert bank.set_index("concept").loc["pad thai", "generation_sample"] == 2
    assert load_bank(out / "bank.parquet") == sorted(set(bank["concept"]) - {"hammer", "sledgehammer"})
    hist = json.loads((out / "history.json").read_text())
    assert [g["size"] for g in hist["generation"]] == [3, 5, 5]
    assert [e["size"] for e in hist["expansion"]] == [5, 11, 11]
    lines = [json.loads(x) for x in (out / "transcripts.jsonl").read_text().splitlines()]
    assert sum(r["step"] == "expand" for r in lines) == 5 + 11
    assert json.loads(met.read_text())["B0"] == 5
    assert (out / "coverage.csv").exists() and (out / "coverage_hist.csv").exists()


def test_stage_budgets_l2_history_to_the_servers_context(tmp_path, server):
    """`vllm serve` reports max_model_len: with one token less than the longest L2 request needs, the
    history loses an L1 sample, every L2 request then fits (openai backend: the documented estimate),
    and metrics/concepts.json says what was cut."""
    import concepts as stage

    from pas.llm.base import estimate_tokens

    write_params(tmp_path / "params.yaml", server.url)
    args = ["--params", str(tmp_path / "params.yaml"), "--no-progress"]

    def expand_bodies():
        return [b for b in server.bodies if "similar to" in b["messages"][-1]["content"]]

    stage.main(args + ["--out", str(tmp_path / "a"), "--metrics", str(tmp_path / "a.json")])
    need = max(estimate_tokens(b["messages"]) + b["max_tokens"] for b in expand_bodies())
    server.bodies.clear()
    server.n_gen = 0
    server.models = [{"id": "scripted", "object": "model", "max_model_len": need - 1}]
    m = stage.main(args + ["--out", str(tmp_path / "b"), "--metrics", str(tmp_path / "b.json")])
    assert m["history_context_tokens"] == need - 1
    assert all(k + d == 3 for k, d in zip(m["history_samples_kept"], m["history_samples_dropped"]))
    assert max(m["history_samples_dropped"]) >= 1                 # the round of the longest prompt
    assert all(estimate_tokens(b["messages"]) + b["max_tokens"] <= need - 1 for b in expand_bodies())
    assert json.loads((tmp_path / "b.json").read_text())["history_samples_dropped"] == m["history_samples_dropped"]


def test_stage_coverage_with_clip_text_tower(tmp_path, server, tiny_clip_dir):
    """Paper §4.2: "we compute the CLIP ViT-L/14 lexical embeddings"; coverage_embedder clip uses the
    text tower of models/clip (here the tiny offline CLIP) and never loads the sentence embedder."""
    import numpy as np

    import concepts as stage
    from pas.concepts.coverage import load_reference
    from pas.models.clip import load_clip

    write_params(tmp_path / "params.yaml", server.url, references=["food101"], coverage_embedder="clip")
    out = tmp_path / "data" / "concepts"
    m = stage.main(["--params", str(tmp_path / "params.yaml"), "--out", str(out), "--metrics",
                    str(tmp_path / "m.json"), "--no-progress", "--clip", str(tiny_clip_dir),
                    "--text-embed", str(tmp_path / "absent")])
    cov = pd.read_csv(out / "coverage.csv")
    names, kept = load_reference("food101"), load_bank(out / "bank.parquet")
    clip = load_clip(tiny_clip_dir)
    s = clip.encode_texts(names) @ clip.encode_texts(kept).T          # (101, |B|) cosine
    assert cov["class_name"].tolist() == names
    assert cov["nearest_concept"].tolist() == [kept[j] for j in s.argmax(1)]
    np.testing.assert_allclose(cov["similarity"], s.max(1), atol=1e-5)
    assert m["coverage"]["food101"]["mean_max_similarity"] == pytest.approx(float(s.max(1).mean()), abs=1e-5)


def test_stage_bad_params_name_the_key(tmp_path, server):
    import concepts as stage

    write_params(tmp_path / "params.yaml", server.url, validator="oracle")
    with pytest.raises(P.ParamsError, match="concepts.validator"):
        stage.main(["--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "o"),
                    "--metrics", str(tmp_path / "m.json")])


class VerdictServer(ScriptedServer):
    """ScriptedServer whose L3 replies come from `verdict(concept)` (an answer dict)."""

    def __init__(self, verdict):
        self.verdict = verdict
        super().__init__()

    def answer(self, body):
        if body.get("logprobs"):
            return self.verdict(body["messages"][-1]["content"])
        return super().answer(body)


def run_failing(tmp_path, url, caplog):
    import concepts as stage

    write_params(tmp_path / "params.yaml", url)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        stage.main(["--params", str(tmp_path / "params.yaml"), "--out", str(out), "--metrics",
                    str(tmp_path / "m.json"), "--no-progress"])
    assert e.value.code == 1
    assert not (out / "bank.parquet").exists() and not (tmp_path / "m.json").exists()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0]
    return errors[0]


def test_stage_counts_unclear_verdicts_and_rejects_them(tmp_path):
    import concepts as stage

    def verdict(q):  # ramen: an answer without log-probs that says neither yes nor no
        if '"ramen"' in q:
            return {"choices": [{"message": {"content": "Maybe, it depends."}, "logprobs": {"content": []}}]}
        yes = -0.05 if "hammer" not in q else -3.0
        top = [{"token": "Yes", "logprob": yes}, {"token": "No", "logprob": -3.0 if yes > -1 else -0.05}]
        return {"choices": [{"message": {"content": "Yes"}, "logprobs": {"content": [{"top_logprobs": top}]}}]}

    s = VerdictServer(verdict)
    try:
        write_params(tmp_path / "params.yaml", s.url)
        m = stage.main(["--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "o"), "--metrics",
                        str(tmp_path / "m.json"), "--no-progress"])
    finally:
        s.close()
    # 11 candidates (as in test_stage_with_scripted_server): 2 hammers say no, ramen is unclear
    assert m["n_unclear"] == 1 and m["verdicts"] == {"logprobs": 10, "unclear": 1} and m["n_unusable"] == 0
    assert m["B_after_validation"] == 8
    bank = pd.read_parquet(tmp_path / "o" / "bank.parquet").set_index("concept")
    assert not bank.loc["ramen", "accepted"] and pd.isna(bank.loc["ramen", "score"])


def test_stage_fails_when_l3_logprobs_are_nan(tmp_path, caplog):
    # before: every concept rejected as "no", an empty bank, rc = 0
    nan = {"choices": [{"message": {"content": "Yes"},
                        "logprobs": {"content": [{"top_logprobs": [{"token": "Yes", "logprob": float("nan")}]}]}}]}
    s = VerdictServer(lambda q: nan)
    try:
        msg = run_failing(tmp_path, s.url, caplog)
    finally:
        s.close()
    assert msg.startswith("concepts failed: L3 gave no usable verdict for 11 concepts: 11 unusable")


def test_stage_refuses_an_empty_bank(tmp_path, caplog):
    no = {"choices": [{"message": {"content": "No"},
                       "logprobs": {"content": [{"top_logprobs": [{"token": "No", "logprob": -0.01}]}]}}]}
    s = VerdictServer(lambda q: no)
    try:
        msg = run_failing(tmp_path, s.url, caplog)
    finally:
        s.close()
    assert "no concept of 11 passed llm validation" in msg and "refusing to write an empty bank" in msg


def test_stage_fails_at_once_on_a_bad_key(tmp_path, caplog, server):
    server.plan = [401] * 50
    msg = run_failing(tmp_path, server.url, caplog)
    assert msg.startswith("concepts failed: llm.l1: ") and "HTTP 401" in msg and len(server.bodies) == 1


def test_stage_exit_status_when_the_server_is_down(tmp_path):
    write_params(tmp_path / "params.yaml", "http://127.0.0.1:9/v1")
    r = subprocess.run([sys.executable, str(ROOT / "stages" / "concepts.py"), "--params", str(tmp_path / "params.yaml"),
                        "--out", str(tmp_path / "out"), "--metrics", str(tmp_path / "m.json"), "--no-progress"],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(
        "ERROR pas.stages.concepts: concepts failed: llm.l1: cannot reach http://127.0.0.1:9/v1/chat/completions")
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


SMOKE_CONCEPTS = {"max_generation_samples": 4, "generation_batch": 4, "generation_max_new_tokens": 96,
                  "expansion_max_new_tokens": 24, "max_expansion_rounds": 1, "max_concepts": 64,
                  "history_samples": 1, "validator": "embedding", "validator_threshold": 0.18,
                  "references": ["food101", "cub200"], "coverage_threshold": 0.7}


@pytest.mark.slow
def test_stage_offline_smollm2_minilm(tmp_path):
    """The offline default: SmolLM2-135M (converted from the pip GGUF) for L1 = L2, MiniLM validator."""
    import concepts as stage
    from pas.models.llm import prepare_llm
    from pas.models.text_embed import prepare_text_embed

    llm_dir = prepare_llm(out_dir=tmp_path / "models" / "llm")
    te_dir = prepare_text_embed(out_dir=tmp_path / "models" / "text_embed")
    spec = {"backend": "transformers", "model": str(llm_dir), "temperature": 0.8, "top_p": 0.95,
            "repetition_penalty": 1.1, "max_new_tokens": 128, "batch_size": 8, "threads": 1}
    params = {"lambda_1": 0.01, "lambda_2": 0.01, "seed": 0,
              "domain": {"name": "food", "description": "dishes and foods from every cuisine in the world"},
              "llm": {"l1": spec, "l2": spec, "l3": spec, "l4": spec}, "concepts": SMOKE_CONCEPTS}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    args = ["--params", str(tmp_path / "params.yaml"), "--text-embed", str(te_dir), "--no-progress"]
    m1 = stage.main(args + ["--out", str(tmp_path / "a"), "--metrics", str(tmp_path / "a.json")])
    assert m1["B0"] > 0 and m1["B_before_validation"] >= m1["B0"] >= 1
    assert 0 < m1["B_after_validation"] <= m1["B_before_validation"]
    assert set(m1["coverage"]) == {"food101", "cub200"}
    assert m1["coverage"]["food101"]["mean_max_similarity"] > m1["coverage"]["cub200"]["mean_max_similarity"]
    m2 = stage.main(args + ["--out", str(tmp_path / "b"), "--metrics", str(tmp_path / "b.json")])
    assert (tmp_path / "a" / "bank.parquet").read_bytes() == (tmp_path / "b" / "bank.parquet").read_bytes()
    assert (tmp_path / "a" / "transcripts.jsonl").read_bytes() == (tmp_path / "b" / "transcripts.jsonl").read_bytes()
    assert m1["B_after_validation"] == m2["B_after_validation"]


DVC_YAML = """
stages:
  models:
    cmd: python -c "from pas.models.text_embed import prepare_text_embed; prepare_text_embed(out_dir='models/text_embed')"
    outs:
      - models/text_embed
  concepts:
    cmd: python {wrapper} --params params.yaml --text-embed models/text_embed --out data/concepts --metrics metrics/concepts.json --no-progress
    deps:
      - {stage}
      - models/text_embed
    params:
      - lambda_1
      - lambda_2
      - seed
      - domain
      - llm.l1
      - llm.l2
      - llm.l3
      - concepts
    outs:
      - data/concepts
    metrics:
      - metrics/concepts.json:
          cache: false
plots:
  - concept_coverage:
      template: simple
      x: similarity
      y:
        data/concepts/coverage_hist.csv: [food101]
"""


@pytest.mark.slow
def test_dvc_repro_concepts_and_lambda_2_reruns_only_concepts(tmp_path, server):
    wrapper = tmp_path / "run_concepts.py"  # runs the stage script from this checkout
    wrapper.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / 'stages')!r})
        import concepts
        concepts.main()
    """))
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

    def run(*cmd):
        r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout + r.stderr

    run("git", "init", "-q")
    run("dvc", "init", "-q")
    (repo / "dvc.yaml").write_text(DVC_YAML.format(wrapper=wrapper, stage=ROOT / "stages" / "concepts.py"))
    write_params(repo / "params.yaml", server.url, references=["food101"])
    out = run("dvc", "repro", "concepts")
    assert "Running stage 'models'" in out and "Running stage 'concepts'" in out
    assert json.loads((repo / "metrics" / "concepts.json").read_text())["B0"] == 5
    assert "didn't change" in run("dvc", "repro", "concepts")
    r = subprocess.run(["dvc", "plots", "show", "--json"], cwd=repo, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "concept_coverage" in json.loads(r.stdout)["data"], r.stdout + r.stderr
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["lambda_2"] = 0.9  # round 1 adds 6 ≥ 0.9·5 → goes on; round 2 adds 0 → stops
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    server.n_gen = 0
    out = run("dvc", "repro", "concepts")
    assert "Running stage 'concepts'" in out and "Running stage 'models'" not in out
    m = json.loads((repo / "metrics" / "concepts.json").read_text())
    assert m["expansion_rounds"] == 2 and m["expansion_stop"] == "lambda_2" and m["B_before_validation"] == 11
