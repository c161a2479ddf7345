"""diffusers glue: `accelerate(pipe, config)` runs a pipeline with CAT Pruning.

The pipeline keeps its own argument handling, text encoders, scheduler, guidance and VAE; for the
length of one call catrt replaces only the transformer's forward with a `CATRuntime` step.

Calls that share a transformer run one at a time: a diffusers pipeline keeps per-call state (its
scheduler, `_guidance_scale`), and catrt's step buffers and the replaced forward are per transformer.
A second thread waits for the first; the replaced forward runs catrt's step only for the thread that
installed it, so a plain `pipe(...)` from another thread meanwhile still runs the transformer as is.
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, Literal

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from catrt.attribute_forwarding import ForwardsAttributes
from catrt.call_arguments import check_call_arguments, check_clip_skip, check_latents, refuse_config_keywords
from catrt.callbacks import check_cfg_cutoff
from catrt.config import CATConfig
from catrt.contract import StepFunctions
from catrt.errors import ConfigError, UnsupportedModelError, echo
from catrt.models import PIPELINES, make_adapter
from catrt.models.base import check_runs_as_loaded
from catrt.models.inputs import check_transformer_inputs
from catrt.pipeline_facts import check_latent_channels
from catrt.pipeline_spec import PipelineSpec, call_default, custom_schedule, denoising_steps, strength_steps
from catrt.runtime import CATRuntime, StepRecord, refuse_eager_only_rules
from catrt.scheduler_calls import (
    check_schedule_steps_run,
    check_scheduler_order,
    check_scheduler_sizes,
    check_scheduler_timesteps,
)
from catrt.step_state import RuntimeBuffers


def register_pipeline(pipeline_class: type, spec: PipelineSpec) -> None:
    """Let another pipeline class whose transformer has an adapter be accelerated."""
    if not isinstance(pipeline_class, type) or not isinstance(spec, PipelineSpec):
        raise ConfigError(
            f"register_pipeline takes a pipeline class and a catrt PipelineSpec, got {echo(pipeline_class)} and "
            f"{type(spec).__name__}",
            field="spec" if isinstance(pipeline_class, type) else "pipeline_class",
        )
    PIPELINES[pipeline_class] = spec


def pipeline_spec(pipe: Any) -> PipelineSpec:
    spec = PIPELINES.get(type(pipe))
    if isinstance(pipe, AcceleratedPipeline):
        raise UnsupportedModelError(
            "this pipeline is already accelerated (an AcceleratedPipeline); accelerate its diffusers pipeline, "
            "catrt.accelerate(fast.pipe, config), or call it with alpha= for another alpha",
            field="pipe", value=type(pipe).__name__,
        )
    if isinstance(pipe, type) and pipe in PIPELINES:  # `catrt.accelerate(FluxPipeline)`: the class, not a loaded one
        raise UnsupportedModelError(
            f"catrt cannot accelerate the class {pipe.__name__} itself: pass a loaded pipeline "
            f"({pipe.__name__}.from_pretrained(...), or catrt.load_pipeline(name))", field="pipe", value=pipe.__name__,
        )
    if spec is None:
        supported = ", ".join(cls.__name__ for cls in PIPELINES)
        name = pipe.__name__ if isinstance(pipe, type) else type(pipe).__name__  # a class: its name, not "type"
        raise UnsupportedModelError(
            f"catrt cannot accelerate {name}; supported pipelines: {supported}", field="pipe", value=name,
        )
    return spec


def default_image_size(pipe: Any) -> int:
    """The pipeline's own image side in pixels when a call gives none: its `__call__`'s default height where that is
    a number (AuraFlow's 1024), else its default sample size in latent cells (SD3, PixArt, FLUX default to None)."""
    height = call_default(pipe, "height") if "height" in inspect.signature(pipe.__call__).parameters else None
    if isinstance(height, int) and not isinstance(height, bool):
        return height
    cells = getattr(pipe, "default_sample_size", None) or pipe.transformer.config.sample_size
    return int(cells * pipe.vae_scale_factor)


#: An AcceleratedPipeline's instance attributes; every other one, read or set, but its class's own (`to`,
#: `runtime_class`) is its diffusers pipeline's.
_OWN_ATTRIBUTES = frozenset({
    "spec", "pipe", "config", "adapter", "functions", "cuda_graphs", "buffers", "last_trace", "_signature", "_configs",
})


class AcceleratedPipeline(ForwardsAttributes):
    """A diffusers pipeline whose transformer calls run under CAT Pruning.

    Called with the pipeline's own arguments, plus catrt's `alpha` (this call's fraction of tokens
    recomputed per pruned step; `config.alpha` if absent); returns what the pipeline returns. After
    each call, `last_trace` lists one `StepRecord` per step run when `config.trace` is on (a call that
    failed or was interrupted: the steps that ran before it stopped). The runtime's
    buffers (caches, captured CUDA graphs) are kept across calls per shape and k, so switching alpha
    back and forth allocates nothing after each alpha's first call.
    """

    _target = "pipe"
    _own_attributes = _OWN_ATTRIBUTES

    #: What each call runs the steps with; bench/ substitutes a subclass (an oracle baseline).
    runtime_class: type[CATRuntime] = CATRuntime

    def __init__(
        self, pipe: Any, config: CATConfig, functions: StepFunctions | None = None, cuda_graphs: bool | None = None
    ) -> None:
        self.pipe = pipe  # and its spec and call signature (see __setattr__)
        check_accelerate_arguments(config, functions, cuda_graphs)
        self.config = config
        self.adapter = make_adapter(pipe.transformer)
        check_latent_channels(pipe, self.spec)
        self.functions = functions
        self.cuda_graphs = cuda_graphs
        self.buffers = RuntimeBuffers()
        self.last_trace: list[StepRecord] = []
        self._configs: dict[float, CATConfig] = {config.alpha: config}

    def config_for(self, alpha: float | None) -> CATConfig:
        """The config of a call at `alpha` (None = `config.alpha`): `config` with that alpha, validated once."""
        if alpha is None:
            return self.config
        if self._configs.get(self.config.alpha) is not self.config:  # `fast.config = ...` since: derive from that one
            self._configs = {self.config.alpha: self.config}
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):  # a list or a tensor: not hashable, or not
            replace(self.config, alpha=alpha)  # one value; True would find alpha 1's config (True == 1): CATConfig refuses it
        if alpha not in self._configs:
            self._configs[alpha] = replace(self.config, alpha=alpha)  # CATConfig checks the value, naming alpha
        return self._configs[alpha]

    def __call__(self, *args: Any, alpha: float | None = None, **kwargs: Any) -> Any:
        with exclusive_use(self.pipe.transformer):
            return self._call(args, alpha, kwargs)

    def to(self, *args: Any, **kwargs: Any) -> AcceleratedPipeline:
        """The pipeline's `to` (device, dtype), returning this accelerated pipeline: `fast = fast.to("cuda")`
        keeps CAT Pruning, where the diffusers pipeline `to` returns would run unpruned."""
        with exclusive_use(self.pipe.transformer):
            self.pipe.to(*args, **kwargs)
        return self

    def _call(self, args: tuple[Any, ...], alpha: float | None, kwargs: dict[str, Any]) -> Any:
        self.last_trace = []  # this call's, even where it is refused or fails: never the call before's
        config = self.config_for(alpha)
        refuse_config_keywords(self._signature, kwargs)
        bound = self._signature.bind(*args, **kwargs)
        if self.spec.default_fixes is not None:
            fixes = {name: value for name, value in self.spec.default_fixes(self.pipe).items() if name not in bound.arguments}
            kwargs = {**kwargs, **fixes}
            bound.arguments.update(fixes)
        bound.apply_defaults()
        steps = denoising_steps(bound.arguments)
        schedule = custom_schedule(bound.arguments)
        if schedule is not None and schedule[1] == 0:  # diffusers would run no step and decode pure noise
            raise ConfigError(f"{schedule[0]} is empty: give at least t0 + 1 values, or leave it None", field=schedule[0])
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ConfigError(f"num_inference_steps must be a positive integer, got {echo(steps)}", field="num_inference_steps")
        if self.spec.check_call is not None:
            self.spec.check_call(bound.arguments)
        planned, steps = steps, self._steps_run(config, bound.arguments, steps)
        scheduler = getattr(self.pipe, "scheduler", None)
        check_scheduler_order(scheduler)
        check_scheduler_sizes(scheduler)
        self._follow_transformer()
        check_latent_channels(self.pipe, self.spec)  # the transformer or VAE may be another since accelerate
        guidance = self.spec.doubles_batch(bound.arguments)
        grid = self.spec.token_grid(self.pipe, bound.arguments) if self.spec.token_grid is not None else None
        images = check_call_arguments(self._signature, bound.arguments, guidance)
        check_clip_skip(self.pipe, bound.arguments)
        check_cfg_cutoff(bound.arguments.get("callback_on_step_end"), images * (1 + guidance), steps)
        if not self.spec.takes_image:  # img2img sizes its latents from the image
            check_latents(self.pipe, bound.arguments, lambda: default_image_size(self.pipe))
        runtime = self.runtime_class(
            self.adapter, config, steps, guidance, self.functions, self.buffers, self.cuda_graphs, grid=grid,
            edited_between_steps=_may_edit_inputs(bound.arguments, self.pipe.transformer),
        )
        self.last_trace = runtime.trace  # the steps run so far, as they run: a call that fails mid-way shows which ran
        adapter = self.adapter

        def step(hidden_states: torch.Tensor, timestep: torch.Tensor, arguments: dict[str, Any]) -> torch.Tensor:
            if runtime.step == 0:  # the pipeline has set its scheduler's timesteps; no step has run
                check_scheduler_timesteps(scheduler, planned)
                check_schedule_steps_run(scheduler, schedule, config.t0)
            check_transformer_inputs(adapter, {"hidden_states": hidden_states, **arguments}, grid, shapes=runtime.step == 0)
            # A copy: the runtime's prediction is a buffer its next step overwrites, and a multistep scheduler may keep
            # the model output as it is for later steps (DPM-Solver's "dpmsolver", SA-Solver's noise prediction, fed
            # the transformer's output itself without guidance), where the plain transformer returns a new tensor.
            return runtime(hidden_states, timestep, arguments).clone()

        # Fewer calls than `steps` are fine: each ran as its step of the plan (a callback's `pipe._interrupt`, or a
        # scheduler whose custom sigmas end with the final one, such as Euler's); more are refused: a scheduler's extra
        # timesteps at the first call, before any step runs, and any other call past the plan by the runtime.
        with transformer_replaced(self.pipe.transformer, step):
            return self.pipe(*args, **kwargs)

    def _steps_run(self, config: CATConfig, arguments: dict[str, Any], steps: int) -> int:
        """The transformer calls this call makes: img2img's `strength` runs only the last of `steps`, and t0 counts
        those (the runtime's schedule is over the steps run); a strength leaving t0 or fewer is refused here, naming it."""
        name = self.spec.strength_argument
        if name is None:
            return steps
        run = strength_steps(arguments, steps, name)
        if not config.t0 < run:
            raise ConfigError(
                f"{name}={arguments[name]!r} runs {run} of the {steps} steps, and CATConfig.t0 = {config.t0} needs t0 < "
                f"the steps run; raise {name} or num_inference_steps, or lower t0",
                field=name, value=arguments[name],
            )
        return run

    def _follow_transformer(self) -> None:
        """Run the pipeline's transformer as it is now: a user may assign another `pipe.transformer` or set
        attention processors after `accelerate`, which the adapter must see (or refuse), not run the old weights."""
        transformer = self.pipe.transformer
        _refuse_device_hooks(transformer)
        if transformer is self.adapter.transformer:
            self.adapter.check_layout(transformer)
            check_runs_as_loaded(self.adapter, transformer)
            return
        if self.functions is not None:
            raise UnsupportedModelError(
                "pipe.transformer was replaced after catrt.accelerate, and these step functions run the one it had "
                "then: accelerate (or load) the pipeline again"
            )
        self.adapter = make_adapter(transformer)
        self.buffers = RuntimeBuffers(self.buffers.max_shapes)  # its K/V slots and width may differ from the old one's

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "config":  # `fast.config = ...` runs the calls after it: a CATConfig, as accelerate takes
            check_accelerate_arguments(value, None, None)
        if name == "functions":  # and these, as accelerate takes them, where a call would fail deep in a step
            check_accelerate_arguments(self.config, value, None)
        if name == "cuda_graphs":
            check_accelerate_arguments(self.config, None, value)
        if name == "buffers" and not isinstance(value, RuntimeBuffers):
            raise ConfigError(
                f"buffers must be a catrt.runtime.RuntimeBuffers, got {type(value).__name__}; make one with "
                f"catrt.runtime.RuntimeBuffers(max_shapes=...)",
                field="buffers", value=type(value).__name__,
            )
        if name == "pipe":  # at construction and `fast.pipe = ...`: the calls after it run that pipeline's class, whose
            # spec (guidance kind, token grid) and signature they read; kept from another class, a FLUX pipeline's
            # spec ran an SD3 call's [uncond, cond] rows as 2 x batch images (a wrong image, no error)
            super().__setattr__("spec", pipeline_spec(value))  # one catrt cannot run is refused here, by name
            super().__setattr__("_signature", inspect.signature(value.__call__))
        super().__setattr__(name, value)


class _CallLock:
    """One transformer's lock, and the thread holding it (a call from inside its own generation is refused)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owner: int | None = None


_CALL_LOCKS: weakref.WeakKeyDictionary[nn.Module, _CallLock] = weakref.WeakKeyDictionary()
_CALL_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def exclusive_use(transformer: nn.Module) -> Iterator[None]:
    """Hold `transformer` for one accelerated call: another thread's call waits until this one is done.

    A call from inside a generation on the same transformer (a callback that calls the accelerated
    pipeline again) would wait for itself; it is refused instead, as is a pipeline whose transformer was set to no
    model (`fast.transformer = None`), which has nothing to hold.
    """
    if not isinstance(transformer, nn.Module):  # a TypeError from the weak-keyed locks, naming nothing
        raise UnsupportedModelError(
            f"pipe.transformer is {type(transformer).__name__}, not a transformer model; set the pipeline's transformer "
            f"back (or accelerate a pipeline that has one)",
            field="transformer", value=type(transformer).__name__,
        )
    with _CALL_LOCKS_GUARD:
        entry = _CALL_LOCKS.setdefault(transformer, _CallLock())
    me = threading.get_ident()
    if entry.owner == me:
        raise ConfigError(
            "the accelerated pipeline was called from inside one of its own generations (a callback_on_step_end?); "
            "catrt's step buffers belong to the running one: call it again after it returns",
            field="callback_on_step_end",
        )
    with entry.lock:
        entry.owner = me
        try:
            yield
        finally:
            entry.owner = None


def check_accelerate_arguments(config: Any, functions: Any, cuda_graphs: Any) -> None:
    """Refuse a config, step functions or cuda_graphs of the wrong kind by name, before any call uses them."""
    if not isinstance(config, CATConfig):
        raise ConfigError(
            f"config must be a catrt.CATConfig, got {type(config).__name__} {echo(config)}; make one with "
            f"catrt.CATConfig(alpha=..., t0=...) (or CATConfig.from_dict for a dict)",
            field="config", value=type(config).__name__,
        )
    missing = [name for name in ("prepare_context", "full_forward", "pruned_forward") if not callable(getattr(functions, name, None))]
    if functions is not None and missing:
        raise ConfigError(
            f"functions must be step functions (an engine, or an object with prepare_context, full_forward and "
            f"pruned_forward); {type(functions).__name__} has no {', '.join(missing)}",
            field="functions", value=type(functions).__name__,
        )
    if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
        raise ConfigError(f"cuda_graphs must be True, False or None, got {echo(cuda_graphs)}", field="cuda_graphs", value=cuda_graphs)


def _refuse_device_hooks(transformer: nn.Module) -> None:
    """Refuse a transformer whose weights accelerate's hooks move around each forward, naming the cause.

    `enable_model_cpu_offload` moves the transformer to the GPU in a hook of its forward, which catrt's
    steps replace: its weights would stay on the CPU under CUDA latents. Sequential offload and device
    maps load each submodule's weights in hooks, while the adapters read weights directly. And a captured
    CUDA graph would replay weights an offload has moved away.
    """
    for name, module in transformer.named_modules():
        hook = vars(module).get("_hf_hook")  # accelerate sets a plain attribute: read where it lives, not through nn.Module.__getattr__ per module
        if hook is not None:
            where = f"module {name!r} of the transformer" if name else "the transformer"
            raise UnsupportedModelError(
                f"{where} has an accelerate hook ({type(hook).__name__}: enable_model_cpu_offload, "
                f"enable_sequential_cpu_offload or a device_map), which moves its weights around each forward; catrt "
                f"reads the transformer's weights directly and keeps its steps' buffers on one device: move the "
                f"pipeline there with pipe.to(device) instead of CPU offload"
            )


def accelerate(
    pipe: Any,
    config: CATConfig | None = None,
    functions: StepFunctions | None = None,
    *,
    backend: Literal["eager", "compile"] = "eager",
    cuda_graphs: bool | None = None,
) -> AcceleratedPipeline:
    """Wrap a diffusers pipeline so its calls run with CAT Pruning.

    Args:
        pipe: a `StableDiffusion3Pipeline`, `PixArtSigmaPipeline` or `FluxPipeline`, their img2img / inpainting
            variants, `PixArtAlphaPipeline` (or a registered class).
        config: the pruning settings; `CATConfig()` by default (alpha 0.3, t0 8).
        functions: the step graphs to run (an engine); by default the adapter, run as `backend` says.
        backend: "eager" runs the adapter as is; "compile" runs it through `torch.compile`.
        cuda_graphs: capture every step as one CUDA graph; None = on for "compile" on a CUDA device.

    Example:
        >>> pipe = catrt.load_pipeline("tiny-sd3")
        >>> fast = catrt.accelerate(pipe, catrt.CATConfig(alpha=0.3))
        >>> image = fast("a red circle", num_inference_steps=28, height=64, width=64).images[0]
        >>> faster = fast("a red circle", num_inference_steps=28, height=64, width=64, alpha=0.2).images[0]
    """
    pipeline_spec(pipe)  # an unsupported pipeline is refused before anything is compiled
    config = CATConfig() if config is None else config
    check_accelerate_arguments(config, functions, cuda_graphs)
    if backend not in ("eager", "compile"):
        raise ConfigError(f"accelerate's backend must be eager or compile, got {echo(backend)}", field="backend", value=backend)
    if functions is not None or backend == "compile":
        refuse_eager_only_rules(config)  # before compiling, not at the first call
    if functions is None and backend == "compile":
        from catrt.engines.compile import compile_step_functions

        functions = compile_step_functions(make_adapter(pipe.transformer))
    return AcceleratedPipeline(pipe, config, functions, cuda_graphs)


@contextlib.contextmanager
def transformer_replaced(transformer: nn.Module, runtime: Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], torch.Tensor]) -> Iterator[None]:
    """Route `transformer(...)` to `runtime(hidden_states, timestep, other kwargs)` for one pipeline call.

    Module hooks still fire (the server times steps with them). A `forward` set on the instance before
    (a user's wrapper) is put back afterwards, not deleted. Only the pipeline's own step calls are routed:
    another thread's call (a plain `pipe(...)` meanwhile) runs the forward the transformer had, and so does a
    call made deeper in the stack than the first step's, on this thread: a callback that runs a plain pipeline
    sharing the transformer (or the transformer itself) between two steps, whose calls were taken as this
    generation's next steps (its latents copied into the caches, the step count overrun).
    """
    signature = inspect.signature(type(transformer).forward)
    previous = transformer.__dict__.get("forward")
    own = previous if previous is not None else type(transformer).forward.__get__(transformer)
    owner = threading.get_ident()
    steps_depth: int | None = None  # the stack depth of the pipeline's step calls, from its first

    def forward(*args: Any, **kwargs: Any) -> Any:
        nonlocal steps_depth
        if threading.get_ident() != owner:
            return own(*args, **kwargs)
        depth = _stack_depth()
        if steps_depth is None:
            steps_depth = depth
        elif depth > steps_depth:
            return own(*args, **kwargs)
        arguments = signature.bind(transformer, *args, **kwargs).arguments
        arguments.pop("self", None)
        hidden_states = arguments.pop("hidden_states")
        timestep = arguments.pop("timestep")
        return_dict = arguments.pop("return_dict", True)
        sample = runtime(hidden_states, _as_batch(timestep, hidden_states), arguments)
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)

    transformer.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del transformer.forward
        else:
            transformer.forward = previous


def _may_edit_inputs(arguments: dict[str, Any], transformer: nn.Module) -> bool:
    """Whether code of the user's runs between a call's steps with the transformer's inputs in reach, and may write them
    in place: a step-end callback (handed the prompt embeddings) or a legacy one, or a hook on the transformer's forward.
    Nothing else can, so where nothing does the runtime need not remake the context each step for inference tensors."""
    callbacks = any(arguments.get(name) is not None for name in ("callback_on_step_end", "callback"))
    hooks = (transformer._forward_pre_hooks, transformer._forward_hooks, nn.modules.module._global_forward_pre_hooks,
             nn.modules.module._global_forward_hooks)
    return callbacks or any(len(hook) for hook in hooks)


#: Where nn.Module's call machinery lives: its frames between a caller and `forward` are one more where the module
#: (or any module: a global one) has hooks, whose nested `inner` calls the forward.
_MODULE_CALL_FILE = nn.Module._call_impl.__code__.co_filename


def _stack_depth() -> int:
    """Frames on this thread's stack below the module call that reached the caller (a few dozen: cheap next to a
    transformer step). nn.Module's own frames are not counted: a hook registered mid-generation (a callback's, or a
    global one of a tool on another thread) puts one more between the pipeline and the forward, whose steps were then
    taken as deeper calls and ran the transformer's own forward, unpruned."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename == _MODULE_CALL_FILE:
        frame = frame.f_back
    depth = 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1
    return depth


def _as_batch(timestep: torch.Tensor | float, hidden_states: torch.Tensor) -> torch.Tensor:
    """Timesteps as a (B,) tensor, as the transformers' embeddings expect."""
    timestep = torch.as_tensor(timestep, device=hidden_states.device)
    return timestep.expand(hidden_states.shape[0]) if timestep.ndim == 0 else timestep
