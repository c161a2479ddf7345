"""Several builds of one model behind one server: a request goes to the build of its `size`.

Builds are checked together before anything loads (`catrt.serve.builds`: one model, one build per
size), then loaded on the worker thread with one pipeline per model, device and dtype (`load_builds`), so
they share the text encoders, tokenizers, VAE and, for eager / compile builds, the transformer.
`RoutedRules` checks a request with the rules of the build its size picks and describes every
served size for the OpenAPI document.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from catrt.errors import ConfigError
from catrt.serve.metrics import alpha_label
from catrt.serve.builds import check_builds
from catrt.serve.config import ServeConfig
from catrt.serve.echo import shorten
from catrt.serve.model import BatchOptions, Row, ServedModel, ServedSpec, load_engines, load_served_model
from catrt.serve.schemas import ImageGenerationRequest
from catrt.serve.validation import RequestRules, parse_size


class Router:
    """The served models by size ("WxH"), in the order given; the first answers size "auto"."""

    def __init__(self, models: Sequence[ServedModel]) -> None:
        self.models: dict[str, ServedModel] = {}
        for model in models:
            if model.spec.size in self.models:
                raise ConfigError(f"two builds serve size {model.spec.size}; serve one build per size", field="size",
                                  value=model.spec.size)
            self.models[model.spec.size] = model
        self.default = next(iter(self.models.values()))

    @property
    def sizes(self) -> list[str]:
        return list(self.models)

    @property
    def max_batch(self) -> int:
        return max(model.spec.batch for model in self.models.values())

    def for_options(self, options: BatchOptions) -> ServedModel:
        """The model a batch of `options` runs on (its size was checked at admission)."""
        return self.default if options.size is None else self.models[options.size]

    def route(self, size: str | None) -> ServedModel:
        """The model serving `size` ("WxH", "auto" or None = the first); else a ConfigError naming `size`."""
        if size is None or size == "auto":
            return self.default
        parse_size(size, self.default.spec.size)
        if size not in self.models:
            raise ConfigError(
                f"size={shorten(size)} is not served: this server serves {', '.join(self.sizes)} "
                f'("auto" = {self.default.spec.size}); ask for one of those or serve a build of that size',
                field="size", value=size,
            )
        return self.models[size]


class RoutedRules:
    """`RequestRules` per served size: `admit` checks a request with its size's rules."""

    def __init__(self, router: Router, max_prompt_chars: int) -> None:
        self.router = router
        self.rules = {size: RequestRules(model, max_prompt_chars) for size, model in router.models.items()}

    def admit(self, body: ImageGenerationRequest) -> tuple[list[Row], BatchOptions]:
        model = self.router.route(body.size)
        return self.rules[model.spec.size].admit(body)

    def spec_for(self, options: BatchOptions) -> ServedSpec:
        return self.router.for_options(options).spec

    def size_rules(self) -> list[dict[str, Any]] | None:
        """The request's `anyOf` in the OpenAPI document where builds differ in batch, steps or alphas: one
        alternative per served size with that build's `n`, `steps` and `alpha`, so a request the document
        takes is one its size's build serves (the properties alone state the union: `n` 2 at a batch-1 size);
        None where every build takes the same. A request without `size` (or "auto") is the first build's."""
        specs = [model.spec for model in self.router.models.values()]
        if len({(spec.batch, spec.steps, spec.alphas) for spec in specs}) == 1:
            return None
        alternatives: list[dict[str, Any]] = []
        for index, spec in enumerate(specs):
            alternative: dict[str, Any] = {"properties": {
                "size": {"enum": [spec.size, "auto", None] if index == 0 else [spec.size]},
                "n": {"anyOf": [{"type": "integer", "maximum": spec.batch}, {"type": "null"}]},
                "steps": {"enum": [spec.steps, None]},
                "alpha": {"enum": [*spec.alphas, None]},
            }}
            if index > 0:
                alternative["required"] = ["size"]
            alternatives.append(alternative)
        return alternatives

    def properties(self) -> dict[str, dict[str, Any]]:
        """The first build's description, with every served size and the widest `n` and step range."""
        properties = self.rules[self.router.default.spec.size].properties()
        specs = [model.spec for model in self.router.models.values()]
        sizes = self.router.sizes
        properties["size"]["anyOf"][0]["enum"] = [*sizes, "auto"]
        properties["size"]["description"] = f'"auto" is {sizes[0]}; served sizes: {", ".join(sizes)}'
        properties["n"]["anyOf"][0]["maximum"] = self.router.max_batch
        properties["n"]["description"] = "images; at most the batch of the size's build: " + ", ".join(
            f"{spec.size}: {spec.batch}" for spec in specs
        )
        properties["steps"]["anyOf"][0]["enum"] = sorted({spec.steps for spec in specs})
        tokens = {spec.size: spec.text_tokens for spec in specs}
        if len(set(tokens.values())) > 1:  # builds may take other text lengths: state each size's
            first = f"at most {tokens[sizes[0]]} tokens"
            each = ", ".join(f"{size}: {count}" for size, count in tokens.items())
            prompt = properties["prompt"]
            prompt["description"] = prompt["description"].replace(first, f"at most the size's build's tokens ({each})")
            properties["negative_prompt"]["description"] = f"same limits as prompt (tokens by size: {each})"
        # A pinned alpha must be one of its size's build: the enum lists every served one, the description which where.
        properties["alpha"]["anyOf"][0]["enum"] = list(dict.fromkeys(alpha for spec in specs for alpha in spec.alphas))
        if len({spec.alphas for spec in specs}) > 1:
            properties["alpha"]["description"] = (
                "a served alpha of the size's build (pinned): " + "; ".join(
                    f"{spec.size}: {', '.join(map(alpha_label, spec.alphas))}" for spec in specs
                ) + "; absent: the server's policy picks"
            )
        return properties


def load_router(config: ServeConfig, bundle_key: bytes | None = None) -> Router:
    """Everything `config` serves, loaded on this thread (which then owns it)."""
    if config.engines is None:
        return Router([load_served_model(config)])
    return Router(load_builds(config.engines, bundle_key))


def load_builds(folders: Sequence[str], bundle_key: bytes | None = None) -> list[ServedModel]:
    """Each build via `catrt.load` (which verifies it), one shared pipeline per model, device and dtype."""
    from catrt.engines import ENGINES
    from catrt.loading import load_pipeline

    builds = check_builds(folders)
    groups = [(build.model, ENGINES[build.backend].default_device(), build.dtype) for build in builds]
    # A group loads transformer weights if any of its builds runs them (eager, compile).
    weights = {group: False for group in groups}
    for group, build in zip(groups, builds, strict=True):
        weights[group] |= ENGINES[build.backend].needs_transformer
    pipes: dict[Any, Any] = {}
    served = []
    for folder, group in zip(folders, groups, strict=True):
        if group not in pipes:
            model, device, dtype = group
            pipes[group] = load_pipeline(model, device=device, dtype=dtype, transformer_weights=weights[group])
        served.append(load_engines(Path(folder), bundle_key, pipes[group]))
    return served
