"""`catrt serve`: an OpenAI-compatible images server over builds of one model (one per size), with one worker
thread owning the device; `--ray` runs the same routes as a Ray Serve application (`catrt.serve.ray_app`).

`run_server` is imported on first use, so building the CLI's parser (which needs `ServeConfig`'s
defaults) does not import uvicorn, FastAPI or torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from catrt.serve.config import ServeConfig

__all__ = ["ServeConfig", "run_server"]

if TYPE_CHECKING:
    from catrt.serve.server import run_server


def __getattr__(name: str) -> Any:
    if name == "run_server":
        from catrt.serve.server import run_server

        return run_server
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
