"""A failed hub download of a published model as one line saying what to do.

diffusers and huggingface_hub raise many kinds (OSError, GatedRepoError, offline errors, HTTP errors); the fix
is the same for all of them: hub access with a login, or a local folder. `loading` raises it for every caller
(Python, the CLI, the server, builds).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from catrt.errors import CatrtError

if TYPE_CHECKING:
    from catrt.model_cards import ModelCard

#: How to log in to the hub: huggingface_hub 1.0 removed `huggingface-cli` (its `hf` came in 0.34).
LOGIN_COMMAND = "`hf auth login` (`huggingface-cli login` before huggingface_hub 1.0)"


def _causes(error: BaseException) -> Iterator[BaseException]:
    """The error and what it was raised from or during, most recent first."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _hub_error_classes() -> tuple[type[BaseException], ...]:
    """huggingface_hub's (and its HTTP client's) error classes, whichever of them this install has."""
    classes: list[type[BaseException]] = [OSError]  # diffusers' EnvironmentError, ConnectionError, timeouts
    with contextlib.suppress(ImportError):
        from huggingface_hub import errors

        classes += [getattr(errors, name) for name in (
            "HfHubHTTPError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "RepositoryNotFoundError",
        ) if hasattr(errors, name)]
    with contextlib.suppress(ImportError):
        import httpx

        classes.append(httpx.HTTPError)
    return tuple(classes)


def is_hub_failure(error: BaseException) -> bool:
    classes = _hub_error_classes()
    return any(isinstance(cause, classes) for cause in _causes(error))


def hub_error(card: ModelCard, error: BaseException) -> CatrtError:
    """One line: gated (a login is needed) or unreachable (offline, not cached), and the two ways out."""
    gated = any(type(cause).__name__ == "GatedRepoError" for cause in _causes(error))
    local = "or pass --model a local diffusers folder saved with save_pretrained"
    if gated:
        return CatrtError(
            f"model {card.name} ({card.hub_id}) is gated on the Hugging Face Hub: accept its license at "
            f"https://huggingface.co/{card.hub_id} and run {LOGIN_COMMAND}, {local}",
            field="model", value=card.name,
        )
    offline_env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    offline = " (HF_HUB_OFFLINE is set)" if offline_env else ""
    return CatrtError(
        f"model {card.name} ({card.hub_id}) could not be loaded: it is not in the local Hugging Face cache and "
        f"the hub could not be reached{offline}. " + (
            f"It is gated and needs hub access: accept its license at https://huggingface.co/{card.hub_id}, run "
            f"{LOGIN_COMMAND} and retry online, {local}" if card.gated else
            f"It needs hub access (it is not gated): retry online, {local}"),
        field="model", value=card.name,
    )
