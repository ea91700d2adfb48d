"""`hf://ORG/NAME[@REVISION]` model ids: resolved to a local snapshot folder with huggingface_hub."""

from __future__ import annotations

import os
import re

from apr_format.errors import InvalidArgument, ModelUnavailable

from .hf_source import CARRIED_FILES, CONFIG_FILE, INDEX_FILE

HUB_PREFIX = "hf://"
# What a checkpoint needs and nothing else (no .bin/.pt pickles, no GGUF or ONNX copies).
ALLOW_PATTERNS = [CONFIG_FILE, INDEX_FILE, "*.safetensors", "special_tokens_map.json", *CARRIED_FILES]
# huggingface_hub's own repo-id rule: ORG/NAME of letters, digits, '-', '_', '.'.
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


def is_hub_id(model: str) -> bool:
    """Whether `model` is an `hf://` model id rather than a local path."""
    return model.startswith(HUB_PREFIX)


def parse_hub_id(model: str) -> tuple[str, str | None]:
    """(repo_id, revision or None) of `hf://ORG/NAME[@REVISION]`.

    Raises:
        InvalidArgument: not of that form.
    """
    body = model[len(HUB_PREFIX):]
    repo_id, _, revision = body.partition("@")
    if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id or (_ and not revision):
        raise InvalidArgument(model, "is not a model id of the form hf://ORG/NAME[@REVISION]")
    return repo_id, revision or None


def download_model(model: str) -> str:
    """The local snapshot folder of `hf://ORG/NAME[@REVISION]`: config, safetensors, index and tokenizer files.

    Uses huggingface_hub's cache and its settings (HF_HOME, HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN,
    HF_HUB_OFFLINE=1 to use the cache only); its progress bars go to stderr.

    Raises:
        InvalidArgument: a malformed id.
        ModelUnavailable: unknown repository or revision, gated/private without access, no network
            and not cached, or a repository without safetensors weights.
    """
    repo_id, revision = parse_hub_id(model)
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hub_errors

    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS)
    except hub_errors.HFValidationError as exc:  # names the Hub refuses, e.g. with '--'
        raise InvalidArgument(model, f"is not a valid model id: {_first_line(exc)}") from None
    except hub_errors.RevisionNotFoundError:
        raise ModelUnavailable(model, f"revision {revision!r} does not exist in {repo_id}") from None
    except hub_errors.GatedRepoError:
        raise ModelUnavailable(model, "is gated: accept its terms on the Hub and set HF_TOKEN") from None
    except hub_errors.RepositoryNotFoundError:
        raise ModelUnavailable(
            model, "no such model on the Hub (check the spelling; a private model needs HF_TOKEN)"
        ) from None
    except hub_errors.LocalEntryNotFoundError as exc:
        raise ModelUnavailable(model, _offline_problem(exc)) from None
    except hub_errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        raise ModelUnavailable(model, f"the Hub answered HTTP {status}: {_first_line(exc)}") from None
    except hub_errors.HTTPError as exc:  # the connection dropped after the file listing
        raise ModelUnavailable(model, f"download failed: {_first_line(exc)}") from None
    _require_weights(model, folder)
    return folder


def _offline_problem(exc: Exception) -> str:
    if "HF_HUB_OFFLINE" in str(exc) or "outgoing traffic has been disabled" in str(exc):
        return "not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it"
    return "the Hub cannot be reached and the model is not in the local Hugging Face cache (check the network or HF_ENDPOINT)"


def _require_weights(model: str, folder: str) -> None:
    if not any(name.endswith(".safetensors") for name in os.listdir(folder)):
        raise ModelUnavailable(model, "the repository has no .safetensors weights (only those are downloaded)")


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
