"""The Hugging Face Hub: a repo (model or dataset) resolved to its local snapshot folder, and raymed's caches.

Snapshots live in the Hub's own cache (``HF_HOME`` / ``HF_HUB_CACHE`` honoured), written and read by
``huggingface_hub.snapshot_download``: with network it fetches what is missing; offline (``HF_HUB_OFFLINE=1``,
or the Hub unreachable) a filled cache is enough. A revision that is a commit hash is looked up in the cache
first, so a pinned snapshot that is already here costs no request at all. Whatever raymed derives from a
snapshot (a converted model, a prepared dataset) goes beside the Hub's cache, under ``$HF_HOME/raymed-*``,
keyed by what it was made from.
"""

from __future__ import annotations

import re
from pathlib import Path

COMMIT = re.compile(r"^[0-9a-f]{40}$")


class HubError(ValueError):
    """A Hub repo that cannot be resolved: not found, gated, no such revision, or offline and not cached."""


def raymed_cache(kind: str) -> Path:
    """``$HF_HOME/raymed-<kind>``: where raymed keeps what it derives from models and datasets on this node."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / f"raymed-{kind}"


def snapshot(repo: str, revision: str | None = None, repo_type: str = "model", what: str | None = None) -> Path:
    """The local snapshot folder of ``repo`` at ``revision`` (default: its main branch), fetched if missing.

    ``what`` names the reference in errors (default ``repo[@revision]``)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = what or (f"{repo}@{revision}" if revision else repo)
    kind = "dataset" if repo_type == "dataset" else "model"
    try:
        if revision and COMMIT.match(revision):
            try:
                return Path(snapshot_download(repo, repo_type=repo_type, revision=revision, local_files_only=True))
            except LocalEntryNotFoundError:
                pass  # not on this node yet: fetch it
        return Path(snapshot_download(repo, repo_type=repo_type, revision=revision))
    except GatedRepoError:
        raise HubError(f"{what}: the {kind} is gated; accept its terms on the Hub, then log in "
                       "(`hf auth login`) or set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise HubError(f"{what}: revision {revision!r} does not exist on the Hub") from None
    except RepositoryNotFoundError:
        raise HubError(f"{what}: no such {kind} on the Hub, or it is private and no token was given "
                       "(`hf auth login` or HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        raise HubError(
            f"{what}: not in the Hub cache ({_cache_dir()}) and the Hub cannot be reached (offline: HF_HUB_OFFLINE=1 "
            "or no network); fetch it once with network access (`hf download`), or point HF_HOME at a filled cache"
        ) from None


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)
