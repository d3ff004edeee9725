"""Session fixtures shared by the tests that use the stand-ins: the tiny Hub repositories, built once.
Import them into a test module (`from tests.standins.fixtures import standin_repos`)."""

from __future__ import annotations

import pytest

from tests.standins.repos import llm_corpus, write_llm_repo, write_minilm_repo, write_sd_repo


@pytest.fixture(scope="session")
def standin_repos(tmp_path_factory):
    """{"sd", "mixtral", "llama2", "minilm"}: folders laid out like the real Hub repositories."""
    root = tmp_path_factory.mktemp("hub-repos")
    corpus = llm_corpus()
    return {"sd": write_sd_repo(root / "sd"), "mixtral": write_llm_repo(root / "mixtral", "mixtral", corpus),
            "llama2": write_llm_repo(root / "llama2", "llama2", corpus), "minilm": write_minilm_repo(root / "minilm")}
