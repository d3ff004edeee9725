"""The kNN client against a local stand-in of clip-retrieval's /knn-service (tests/knn_standin.py)."""

from __future__ import annotations

import numpy as np
import pytest

from pas.collect.clip_client import KnnClient, ServiceError, ServiceParams, query_all
from pas.collect.retrieve import RetrieveParams, retrieve
from pas.params import ParamsError
from tests.knn_standin import Standin

# the body ClipClient.__search_knn_api__ posts (rom1504/clip-retrieval 2.45.0, clip_retrieval/clip_client.py)
CLIP_CLIENT_BODY = {"text", "image", "image_url", "embedding_input", "deduplicate", "use_safety_model",
                    "use_violence_detector", "indice_name", "use_mclip", "aesthetic_score", "aesthetic_weight",
                    "modality", "num_images", "num_result_ids"}


@pytest.fixture()
def service():
    s = Standin()
    yield s
    s.close()


def test_request_body_is_clip_clients(service):
    service.table = {"x": [("red.jpg", 0.5), ("blue.jpg", 0.4)]}
    c = KnnClient(ServiceParams(url=service.url), num_images=7)
    res = c.query(text="x")
    body = service.queries[0]
    assert set(body) == CLIP_CLIENT_BODY
    assert body["num_images"] == body["num_result_ids"] == 7 and body["indice_name"] == "laion5B-L-14"
    assert (body["deduplicate"], body["use_safety_model"], body["aesthetic_score"], body["modality"]) == \
        (True, True, 9, "image")                                   # ClipClient's defaults
    assert [r["url"].rsplit("/", 1)[-1] for r in res] == ["red.jpg", "blue.jpg"]   # the url-less entry dropped
    assert res[0]["caption"] == "a caption of red.jpg" and res[0]["similarity"] == 0.5


def test_query_retries_then_succeeds(service):
    service.table = {"x": [("red.jpg", 0.5)]}
    service.fail_queries = 1
    c = KnnClient(ServiceParams(url=service.url, retries=2, backoff=0.0), num_images=5)
    assert [r["url"].rsplit("/", 1)[-1] for r in c.query(text="x")] == ["red.jpg"]
    assert len(service.queries) == 2


def test_queries_run_concurrently_within_the_bound(service):
    service.query_delay_s = 0.15
    c = KnnClient(ServiceParams(url=service.url, query_workers=3), num_images=2)
    prompts = [f"p{i}" for i in range(12)]
    res = query_all(c, prompts, progress=False)
    assert service.max_in_flight == 3                         # concurrent, never more than query_workers
    want = [[r["url"] for r in service.answer({"text": p, "num_images": 2})[:2]] for p in prompts]
    assert [[r["url"] for r in rs] for rs in res] == want     # answers in prompt order
    c.close()


def test_embedding_queries_send_the_vector(service):
    c = KnnClient(ServiceParams(url=service.url, query="embedding"), num_images=3)
    res = query_all(c, ["a", "b"], embeddings=np.full((2, 4), 0.5, np.float32), progress=False)
    assert [q["text"] for q in service.queries] == [None, None]
    assert all(q["embedding_input"] == [0.5] * 4 for q in service.queries) and len(res[0]) == 3


def test_service_errors_are_clear(service, tmp_path):
    c = KnnClient(ServiceParams(url=service.url, retries=0), num_images=5)
    with pytest.raises(ServiceError, match="indice not found"):
        c.query(text="error please")
    service.fail_queries = 5
    with pytest.raises(ServiceError, match="HTTP 503"):
        c.query(text="x")
    dead = KnnClient(ServiceParams(url="http://127.0.0.1:9/knn-service", retries=1, backoff=0.0,
                                   timeout=1.0), num_images=5)
    with pytest.raises(ServiceError, match="failed after 2 attempts"):
        dead.query(text="x")
    out = tmp_path / "out"
    p = RetrieveParams(backend="clip_service", service={"url": "http://127.0.0.1:9/knn-service", "retries": 0})
    with pytest.raises(ServiceError):
        retrieve(["a"], out, p, cache_dir=tmp_path / "cache", progress=False)
    assert not out.exists()


def test_service_params_validation():
    with pytest.raises(ParamsError, match="query_workers"):
        ServiceParams(query_workers=0)
    with pytest.raises(ParamsError, match="user_agent_token"):
        ServiceParams(user_agent_token="a: b")
    with pytest.raises(ParamsError, match="url"):
        ServiceParams(url="ftp://x")
    with pytest.raises(ParamsError, match="cache"):
        retrieve(["a"], "out", RetrieveParams(backend="clip_service", service={"url": "http://h/knn-service"}))
