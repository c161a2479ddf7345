"""`catrt.load(engine_dir)`: a built bundle as a pipeline, after checking it fits the request and machine.

Every check runs before a backend touches the files: the bundle's integrity (`catrt.integrity`: the
manifest's shape and format, its signature when a key is given, the files the backend needs with
their digests, the build fields against the graphs; CorruptBundleError), the catrt / backend versions
and the device (`catrt.provenance`: EngineMismatchError), the model's transformer config, and on each call the
resolution, batch, steps and text length the graphs were built for (ConfigError).

A bundle whose backend carries its own weights (onnxruntime, tensorrt) loads the pipeline without
the transformer's weights: `pipe.transformer` is a weightless stand-in for its config, and the
weights' identity is the digest the build recorded (the model's weights are not hashed at load). An onnxruntime
bundle's weights.bin is read and hashed once: its engine reads it whole and checks it against the manifest before it
makes any session, so `load`'s check leaves its sha256 to that read (`catrt.integrity.digests_left_to_engine`);
`catrt inspect`, `serve --engines` and `bundle_problems` hash every file. eager and compile
bundles have no weights of their own and run the model's transformer.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from catrt.attribute_forwarding import ForwardsAttributes
from catrt.build_config import FIXED_CAT_FIELDS, BuildConfig, check_static_schedule
from catrt.call_arguments import refuse_config_keywords, request_batch
from catrt.config import CATConfig
from catrt.engines import ENGINES, Engine, GraphSpec
from catrt.errors import PATH_ECHO_LIMIT, CatrtError, ConfigError, CorruptBundleError, EngineMismatchError, UnknownModelError, echo
from catrt.integrity import check_integrity, digests_left_to_engine
from catrt.loading import load_pipeline
from catrt.manifest import Manifest
from catrt.model_cards import check_model_source
from catrt.models import make_adapter
from catrt.pipeline import AcceleratedPipeline, accelerate, check_accelerate_arguments, exclusive_use, pipeline_spec
from catrt.pipeline_spec import PipelineSpec, custom_schedule
from catrt.provenance import describe_device, environment_problems, transformer_config
from catrt.signing import resolve_key

logger = logging.getLogger(__name__)
#: How often `load` (and `bundle_problems`, `catrt inspect`) reads a folder that other builds of its name keep
#: replacing before it gives up.
_LOAD_ATTEMPTS = 3


#: An EnginePipeline's instance attributes; every other one, read or set, but its class's own (`to`, `alphas`) is its
#: accelerated pipeline's.
_OWN_ATTRIBUTES = frozenset({"accelerated", "build", "manifest", "engine"})


class EnginePipeline(ForwardsAttributes):
    """A diffusers pipeline whose transformer steps run on a built engine.

    Called with the pipeline's own arguments, like `catrt.accelerate(...)`'s result; the build's
    height, width, step count and text length are the defaults, and other values are refused.
    `alpha=` picks one of the built `alphas` per call (default: the loaded config's, which is the
    first built one unless `load` was given another).
    """

    _target = "accelerated"
    _own_attributes = _OWN_ATTRIBUTES

    def __init__(self, accelerated: AcceleratedPipeline, build: BuildConfig, manifest: Manifest, engine: Engine) -> None:
        self.accelerated = accelerated
        self.build = build
        self.manifest = manifest
        self.engine = engine

    @property
    def alphas(self) -> tuple[float, ...]:
        """The built alphas, in build order."""
        return self.build.alphas

    def __call__(self, *args: Any, alpha: float | None = None, **kwargs: Any) -> Any:
        with exclusive_use(self.accelerated.pipe.transformer):
            # `last_trace` is this call's, also where the build refuses it (it showed the call before's), as the
            # accelerated pipeline's own refusals leave it; under the lock, so another thread's call keeps its own.
            self.accelerated.last_trace = []
            if alpha is not None:
                alpha = self.build.built_alpha(alpha)  # an unbuilt alpha: a ConfigError naming the built ones
            # The pipeline may have been moved since load (`fast.to(...)`, `fast.pipe.to(...)`): the graphs take the
            # build's.
            check_pipeline_fits(
                self.build, self.accelerated.pipe, self.engine.device, type(self.engine).needs_transformer, "now")
            defaults = {**pipeline_spec(self.accelerated.pipe).call_defaults, **self.build.call_arguments()}
            signature = self.accelerated._signature  # the pipeline's it runs now (`fast.pipe = ...` changes it)
            refuse_config_keywords(signature, kwargs, bundle=True)
            bound = signature.bind(*args, **kwargs)
            for name, value in defaults.items():
                bound.arguments.setdefault(name, value)
            bound.apply_defaults()
            check_request(bound.arguments, self.build, self.accelerated.spec)
        return self.accelerated(*bound.args, alpha=alpha, **bound.kwargs)

    def to(self, *args: Any, **kwargs: Any) -> EnginePipeline:
        """The pipeline's `to`, returning this engine pipeline (as diffusers' `pipe = pipe.to(...)` idiom expects);
        a call after a move to another device or dtype than the build's is refused, naming it.

        A bundle that stands alone holds a weightless stand-in transformer on the meta device, which torch cannot
        move off it: the pipeline's other modules move, the stand-in takes only the dtype (`weightless_transformer`;
        so a call still sees the pipeline's dtype and refuses it where the build's differs).
        """
        self.accelerated.to(*args, **kwargs)
        return self

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "config" and not self._own(name):  # the run config, held to the build as `load(config=...)` is
            check_accelerate_arguments(value, None, None)
            value = _run_config(self.build, value)
        super().__setattr__(name, value)


def check_request(arguments: dict[str, Any], build: BuildConfig, spec: PipelineSpec) -> None:
    """Refuse a call the build's static graphs cannot serve, naming the argument.

    A classifier-free-guidance pipeline's graphs take [uncond, cond] rows (the build samples the
    pipeline's default guidance), so such a call must double its batch (`spec.doubles_batch`); a
    distilled guidance embedding is an input of any value.
    """
    for name, expected in build.call_arguments().items():
        if arguments.get(name) != expected:
            raise ConfigError(
                f"this engine was built for {name}={expected}, the call asks for {name}={arguments.get(name)}; "
                f"call it with {expected} or build an engine for the other value",
                field=name, value=arguments.get(name),
            )
    schedule = custom_schedule(arguments)
    if schedule is not None and schedule[1] != build.steps:
        name, length = schedule
        raise ConfigError(
            f"this engine was built for {build.steps} steps, the call's {name} give {length}; pass "
            f"{build.steps} {name} or build an engine with --steps {length}",
            field=name, value=length,
        )
    batch = request_batch(arguments)
    if batch != build.batch:
        raise ConfigError(
            f"this engine was built for batch={build.batch} images per call, the call asks for {batch} "
            f"(prompts x num_images_per_prompt); build an engine with --batch {batch}",
            field="batch", value=batch,
        )
    if spec.guidance == "cfg" and not spec.doubles_batch(arguments):
        raise ConfigError(
            "this engine runs classifier-free guidance (2 x batch rows); call it with guidance_scale > 1",
            field="guidance_scale", value=arguments.get("guidance_scale"),
        )


def load(
    engine_dir: str | os.PathLike, config: CATConfig | None = None, key: bytes | None = None, pipe: Any = None
) -> EnginePipeline:
    """Load a bundle written by `build_engines` as a callable pipeline.

    Args:
        engine_dir: an `engines/<build-name>/` folder.
        config: CAT settings to run with; alpha must be one of the built alphas (the default alpha of a
            call; the first built one if no config is given), t0 and reuse_every the build's, the other
            fields (clusters, decay, seed...) are free.
        key: the bundle key its build was signed with (`catrt build --sign-key-file`); None = the
            `CATRT_BUNDLE_KEY` environment variable if set. With a key an unsigned or otherwise
            signed bundle is refused; without one a signed bundle loads as any other.
        pipe: a pipeline of the build's model already loaded (on the backend's device, in the build's
            dtype, with transformer weights where the backend runs them), to run on instead of loading
            another: builds of one model served together share its text encoders, VAE and transformer.

    Example:
        >>> fast = catrt.load("engines/tiny-sd3-96x64-b1-s12-t4-a0.30-fp32-onnxruntime")
        >>> image = fast("a red circle", generator=torch.Generator().manual_seed(0)).images[0]
    """
    if not isinstance(engine_dir, (str, os.PathLike)):
        raise ConfigError(
            f"engine_dir must be a folder path (str or os.PathLike), got {type(engine_dir).__name__}", field="engine_dir",
            value=type(engine_dir).__name__,
        )
    if config is not None and not isinstance(config, CATConfig):
        raise ConfigError(
            f"config must be a catrt.CATConfig or None, got {type(config).__name__}; make one with catrt.CATConfig(...)",
            field="config", value=type(config).__name__,
        )
    if pipe is not None:
        pipeline_spec(pipe)  # not a pipeline catrt runs: refused by name
    folder = Path(engine_dir)
    for _ in range(_LOAD_ATTEMPTS):
        identity = _folder_identity(folder)
        try:
            loaded = _load(folder, config, key, pipe)
        except CatrtError:
            if _folder_identity(folder) == identity:
                raise
        else:
            if _folder_identity(folder) == identity:
                return loaded
            pipe = loaded.accelerated.pipe  # the model is loaded already: the folder's new files are what is read again
        # A build of the same name was published (swapped in whole, catrt/publish.py) while this one was read: its
        # checks or the engine may have seen files of both, so the folder now in place is checked and loaded whole.
        logger.info("%s was replaced while it loaded; loading it again", folder)
    raise CorruptBundleError(
        f"{echo(str(folder), PATH_ECHO_LIMIT)} was replaced by another build each time it was loaded ({_LOAD_ATTEMPTS} "
        f"times); load it again once the builds of that name are done", field="engine_dir", value=str(folder),
    )


def _folder_identity(folder: Path) -> tuple[int, int] | None:
    """The folder's (device, inode): a publish puts a new folder in place, so a changed identity means a new build."""
    try:
        info = os.stat(folder)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _load(folder: Path, config: CATConfig | None, key: bytes | None, pipe: Any) -> EnginePipeline:
    """`load` of the folder as it is now."""
    with digests_left_to_engine():  # weights.bin: hashed as the engine reads it, before it makes any session
        manifest = verify_bundle(folder, key)
    build = BuildConfig.from_dict(manifest.build)
    run_config = _run_config(build, config)  # refused before any backend runs
    engine_class = ENGINES[build.backend]
    device = engine_class.default_device()
    given = pipe is not None
    if given:
        check_pipeline_fits(build, pipe, device, engine_class.needs_transformer, "given to load")
    else:
        _check_model_source(folder, build.model)
        pipe = load_pipeline(build.model, device=device, dtype=build.dtype, transformer_weights=engine_class.needs_transformer)
    _check_model(build, manifest, pipe, given)
    adapter = make_adapter(pipe.transformer)
    graphs = {graph: GraphSpec.from_dict(spec) for graph, spec in manifest.graphs.items()}
    engine = engine_class(folder, graphs, device, adapter if engine_class.needs_transformer else None, files=manifest.files)
    engine.load()
    logger.info("loaded %s engine from %s", build.backend, folder)
    return EnginePipeline(accelerate(pipe, run_config, functions=engine), build, manifest, engine)


def check_pipeline_fits(build: BuildConfig, pipe: Any, device: Any, needs_transformer: bool, which: str) -> None:
    """The pipeline runs this build only if its dtype, device and transformer weights fit (`which`: "given to
    load", or "now" for one moved since); else a ConfigError naming the mismatch."""
    transformer = pipe.transformer
    found = {"dtype": transformer.dtype, "device": pipe.text_encoder.device.type}
    expected = {"dtype": build.dtype, "device": device.type}
    if needs_transformer and transformer.device.type == "meta":
        found["transformer weights"], expected["transformer weights"] = "none", "loaded"
    for name, value in expected.items():
        if found[name] != value:
            fix = ("move it back (pipe.to)" if which == "now" else "load one that fits") + " or let catrt.load load its own"
            raise ConfigError(
                f"the pipeline {which} has {name} {found[name]}, the {build.backend} build needs {value}; {fix}",
                field="pipe", value=str(found[name]),
            )


def _check_model(build: BuildConfig, manifest: Manifest, pipe: Any, given: bool) -> None:
    """The model's pipeline (`given`: the one passed to `load`) has the pipeline class, transformer class and
    transformer config the engine was built from."""
    for field, found in (
        ("transformer_class", type(pipe.transformer).__name__),
        ("transformer_config", transformer_config(pipe.transformer)),
        ("pipeline_class", type(pipe).__name__),
    ):
        expected = manifest.model.get(field)
        if expected == found:
            continue
        what = field.replace("_", " ")
        if given:
            shown = f" ({found}, the build's {expected})" if field.endswith("class") else ""
            raise EngineMismatchError(
                f"the pipeline given to load has another {what} than the build's model {echo(build.model, PATH_ECHO_LIMIT)}"
                f"{shown}; pass a pipeline of that model or let catrt.load load its own",
                field="pipe", value={"expected": expected, "found": found},
            )
        raise EngineMismatchError(
            f"model {echo(build.model, PATH_ECHO_LIMIT)} now has another {what} than the engine was built from ({field} in its manifest); "
            f"rebuild the engine",
            field=f"model.{field}",
            value={"expected": expected, "found": found},
        )


def _check_model_source(folder: Path, model: str) -> None:
    """The build's model is still a catrt name or a diffusers folder here; else an error naming `build.model`."""
    try:
        check_model_source(model)
    except UnknownModelError:
        raise UnknownModelError(
            f"{folder} was built from model {echo(model, PATH_ECHO_LIMIT)} (build.model in its manifest), which is neither a catrt model "
            f"name nor a diffusers folder here: put the model folder back at that path or rebuild the engine",
            field="build.model", value=model,
        ) from None


def model_source_problems(folder: Path, manifest: Manifest) -> list[CatrtError]:
    """Whether the build's model loads here (a catrt name, or the diffusers folder it was built from): `catrt.load`
    without a pipeline needs it, so `catrt inspect` reports a folder gone with the bundle's own problems."""
    model = manifest.build.get("model")
    if not isinstance(model, str):
        return []  # a manifest problem, reported as such
    try:
        _check_model_source(folder, model)
    except UnknownModelError as error:
        return [error]
    return []


def verify_bundle(folder: Path, key: bytes | None = None, signature: bool = True) -> Manifest:
    """The bundle's manifest, after checking its integrity, its backend, versions and device here.

    Raises the first problem `bundle_problems` finds; `key` as for `load`; `signature=False` leaves the
    signature to whoever loads the bundle with its key.
    """
    manifest, problems = bundle_problems(folder, key, signature)
    if problems:
        raise problems[0]
    assert manifest is not None
    return manifest


def bundle_problems(
    folder: Path, key: bytes | None = None, signature: bool = True
) -> tuple[Manifest | None, list[CatrtError]]:
    """Every problem of a bundle, integrity first, then whether this machine can run it (nothing raised).

    Returns the manifest where its shape is readable (else None) and the problems, each a catrt error
    naming its file or field. `key`: as for `load` (None = `$CATRT_BUNDLE_KEY`, if set); `signature=False`:
    no signature check. A folder a build of its name replaced (published whole) while it was read is read again, as
    `load` does, so files of two builds are never reported as a corrupt one.
    """
    folder = Path(folder)
    for _ in range(_LOAD_ATTEMPTS):
        identity = _folder_identity(folder)
        manifest, problems = _problems_now(folder, key, signature)
        if not problems or _folder_identity(folder) == identity:
            break
    return manifest, problems


def _problems_now(folder: Path, key: bytes | None, signature: bool) -> tuple[Manifest | None, list[CatrtError]]:
    """`bundle_problems` of the folder as it is now."""
    report = check_integrity(folder, resolve_key(key) if signature else None)
    problems = list(report.problems)
    if report.manifest is None or report.build is None:
        return report.manifest, problems
    engine_class = ENGINES[report.build.backend]
    reason = engine_class.unavailable_reason()
    if reason is not None:
        problems.append(EngineMismatchError(
            f"engine backend {engine_class.name} cannot run here: {reason}", field="backend", value=engine_class.name
        ))
        return report.manifest, problems
    device = describe_device(engine_class.default_device())
    problems += environment_problems(report.manifest, engine_class.package, device, engine_class.device_fields)
    return report.manifest, problems


def _run_config(build: BuildConfig, config: CATConfig | None) -> CATConfig:
    if config is None:
        return build.cat_config()
    config = replace(config, alpha=build.built_alpha(config.alpha))
    for name in FIXED_CAT_FIELDS:
        if name != "alpha" and getattr(config, name) != getattr(build, name):
            raise ConfigError(
                f"this engine was built for {name}={getattr(build, name)}, the config asks for "
                f"{name}={getattr(config, name)}; build an engine with that value",
                field=name, value=getattr(config, name),
            )
    return check_static_schedule(config)
