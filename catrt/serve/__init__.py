"""`catrt serve`: an OpenAI-compatible images server over one build, with one worker thread owning the model."""

from catrt.serve.config import ServeConfig
from catrt.serve.server import run_server

__all__ = ["ServeConfig", "run_server"]
