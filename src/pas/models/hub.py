"""Hugging Face Hub downloads of the `models` stage: one access check for every repository first,
then one snapshot per repository.

Every `kind: hub` spec (`models.diffusion`, `models.llm.<name>`, `models.text_embed`) goes through
here. `check_access` asks the Hub, before anything is downloaded, whether each repository exists, has
the pinned `revision` and the files its loader needs (e.g. the `*.fp16.safetensors` weights of
`variant: fp16`), and whether the token may read it; a failure is one line naming the spec key and
what to do (`HubError`, exit status 2). `download` then fetches only the needed files at the checked
commit and deletes the `.cache/huggingface/` folder `snapshot_download(local_dir=...)` leaves, so the
model folder (a DVC out) holds the model and nothing else.

Token: `HF_TOKEN` (or the one `hf auth login` stored). Gated repositories (Llama-2, Mixtral) need the
token of an account that accepted the model's licence on its Hub page. `HF_ENDPOINT` points the
client at a mirror. No network at import time; huggingface_hub is imported lazily.
"""

from __future__ import annotations

import fnmatch
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pas.params import ParamsError

TOKEN_ENV = "HF_TOKEN"
TOKENS_PAGE = "https://huggingface.co/settings/tokens"


class HubError(ParamsError):
    """A hub spec that cannot be served as written (missing repository or revision, no access)."""

    prefix = "models error"


@dataclass(frozen=True)
class HubRepo:
    """One repository a spec downloads. `where`: the spec's params key (`models.llm.mixtral`)."""

    where: str
    repo_id: str
    revision: str | None = None
    allow_patterns: tuple[str, ...] = ()   # files to download ((): all)
    required: tuple[str, ...] = ()         # patterns that must each match a file (fnmatch), e.g. the
                                           # fp16 variant's weights
    variant: str | None = None             # only named in messages


def _token() -> str | None:
    from huggingface_hub import get_token

    return get_token()   # HF_TOKEN, else the token `hf auth login` stored


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _explain(repo: HubRepo, err: Exception, token: str | None) -> HubError:
    """The Hub's refusal as one line: which spec, which repository, what to do."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    page = f"{_endpoint()}/{repo.repo_id}"
    key = f"{repo.where}.repo={repo.repo_id}"
    if isinstance(err, OfflineModeIsEnabled):
        return HubError(f"{key}: HF_HUB_OFFLINE is set, so nothing can be downloaded: unset it (or "
                        "`export HF_HUB_OFFLINE=0`) for the models stage")
    if isinstance(err, GatedRepoError):
        if token is None:
            return HubError(f"{key}: a gated repository and {TOKEN_ENV} is not set: accept its licence "
                            f"on {page} with your Hugging Face account, then `export {TOKEN_ENV}=<a read "
                            f"token of that account>` ({TOKENS_PAGE})")
        return HubError(f"{key}: a gated repository and the account of {TOKEN_ENV} has no access (yet): "
                        f"accept its licence on {page} (approval may take a while), or export the token "
                        f"of an account that has access as {TOKEN_ENV}")
    if isinstance(err, RevisionNotFoundError):
        return HubError(f"{repo.where}.revision={repo.revision}: no such revision of {repo.repo_id} on the "
                        f"Hub ({page}): pin an existing commit, branch or tag")
    if isinstance(err, RepositoryNotFoundError):
        return HubError(f"{key}: not found on the Hub ({page}): removed, renamed or private; point "
                        f"{repo.where}.repo at a maintained mirror of the same weights (and pin its "
                        f"revision)" + ("" if token else f", or export {TOKEN_ENV} if it is private to you"))
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, HfHubHTTPError) and status == 401:
        return HubError(f"{key}: the Hub refused {TOKEN_ENV} (401, invalid credentials): export a valid "
                        f"read token ({TOKENS_PAGE})")
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return HubError(f"{key}: the Hub at {_endpoint()} cannot serve it ({type(err).__name__}: {first}); "
                    "check the network, proxy and HF_ENDPOINT")


def check_access(repos: Sequence[HubRepo]) -> dict[str, str]:
    """Ask the Hub about every repository before any download: {repo_id: commit sha} when all are
    readable and complete, else `HubError` for the first that is not."""
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    token = _token()
    api = HfApi()
    commits = {}
    for repo in repos:
        try:
            api.auth_check(repo.repo_id, token=token)        # exists, and this token may read it
            info = api.model_info(repo.repo_id, revision=repo.revision, token=token)
        except (HfHubHTTPError, httpx2.HTTPError, OfflineModeIsEnabled, OSError) as e:
            raise _explain(repo, e, token) from None
        files = [s.rfilename for s in info.siblings or []]
        missing = [p for p in repo.required if not fnmatch.filter(files, p)]
        if missing:
            what = f" (variant={repo.variant})" if repo.variant else ""
            raise HubError(f"{repo.where}: {repo.repo_id}@{repo.revision or 'main'} has no {missing[0]}{what}; "
                           f"check {repo.where}.revision / .variant against {_endpoint()}/{repo.repo_id}")
        commits[repo.repo_id] = info.sha
    return commits


def download(repo: HubRepo, out_dir: str | Path, commit: str | None = None) -> Path:
    """Snapshot the repository's wanted files into `out_dir` (at `commit`, the one `check_access`
    saw, else its revision), without huggingface_hub's `.cache/` bookkeeping folder."""
    from huggingface_hub import snapshot_download

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    snapshot_download(repo_id=repo.repo_id, revision=commit or repo.revision, local_dir=str(out),
                      allow_patterns=list(repo.allow_patterns) or None, token=_token())
    shutil.rmtree(out / ".cache", ignore_errors=True)
    return out


def fetch(repo: HubRepo, out_dir: str | Path) -> tuple[Path, str]:
    """check_access + download for one repository: (folder, commit sha)."""
    commit = check_access([repo])[repo.repo_id]
    return download(repo, out_dir, commit), commit
