"""Facts of a registered pipeline class, looked up by the class name a bundle's manifest records.

A bundle is checked without loading its pipeline, so its facts are read from the `PipelineSpec` registered for
`model.pipeline_class`: the graph rows per image and the text tokens before `max_sequence_length`.
"""

from __future__ import annotations

import importlib

from catrt.pipeline_spec import PipelineSpec


def text_tokens_before(pipeline_class: str) -> int | None:
    """The text tokens a registered pipeline class (by name) puts before its `max_sequence_length` ones, as its
    `PipelineSpec.text_tokens_before` declares; None for a class not registered or that does not declare it."""
    spec = _registered_spec(pipeline_class)
    return None if spec is None else spec.text_tokens_before


def rows_per_image(pipeline_class: str) -> int | None:
    """The graph rows per image of a build of a registered pipeline class (by name): 2 under classifier-free
    guidance ([uncond, cond]; engines always run it), 1 under distilled guidance; None for a class not registered."""
    spec = _registered_spec(pipeline_class)
    if spec is None:
        return None
    return 2 if spec.guidance == "cfg" else 1


def _registered_spec(pipeline_class: str) -> PipelineSpec | None:
    """The PipelineSpec registered for a pipeline class by name, whichever module registered it: the families'
    modules and `catrt.loading`'s models (the reference pipeline), imported here, where graphs are read, so a
    bundle is judged the same whether or not its pipeline was imported before."""
    importlib.import_module("catrt.loading")  # registers the reference pipeline's spec
    from catrt.models import PIPELINES, pipeline_named

    cls = pipeline_named(pipeline_class)
    return None if cls is None else PIPELINES[cls]
