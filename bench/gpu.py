"""Transformer speed of SD3-medium, SD3.5-large and PixArt-Sigma (and FLUX.1) on a GPU: diffusers against catrt.

One command for a lent GPU (where the machine has no diffusers, carry its wheel and put it on PYTHONPATH):

    PYTHONUNBUFFERED=1 python3 bench/gpu.py --out $OUT/speed.md 2>&1 | tee $OUT/log

Each model's transformer is built from its published config (`catrt/model_cards.py`) with random
weights, directly on the GPU and in its published dtype (SD3 fp16, SD3.5 bf16, PixArt fp16, FLUX
bf16: made in that dtype, so SD3.5-large never has an fp32 copy); no text encoders, VAE or pipeline.
The script drives the denoising loop itself: 1024x1024 (latent 128x128), one prompt with guidance
(batch 2 [uncond, cond]; FLUX-dev's distilled guidance is an input instead, batch 1), random
conditioning of the shapes the family's registered meta call declares, fixed linear timesteps and a
(guided) Euler flow update of the latents between steps (in place, so the loop itself allocates
nothing and never synchronises). FLUX.1 runs with `--models flux-dev` (not a default: its 12 B
parameters would take most of the time budget).
Variants per model:

- diffusers eager: the transformer module's own forward, 28 full steps.
- diffusers compile: the same with torch.compile, regional by default (each transformer block
  compiled, as diffusers' `compile_repeated_blocks` does: identical blocks share one graph, so it
  compiles in seconds at about the step time of a whole-model compile). Full step only.
- catrt eager: `CATRuntime` over the eager adapter (8 full steps, then 20 pruned steps).
- catrt graphs: the same eager adapter with each step captured as one CUDA graph (what capture gains
  without inductor).
- catrt compile: `CATRuntime` over `compile_step_functions(adapter)`, steps captured as CUDA graphs.

Every variant runs one untimed generation first (compile, CUDA-graph capture), then `--repeats`
timed generations with a CUDA event between steps. A full or pruned step is the median of those
steps over the timed generations (a catrt pruned step includes choosing the next step's tokens);
the generation time is the median of the whole loops. catrt variants then run one more generation
that counts device allocations over a few steady-state pruned steps and runs a few more under
`torch.cuda.set_sync_debug_mode("error")`. The selection is also timed on its own, eagerly and (for
the captured variants) replayed as a CUDA graph. `--profile` adds torch.profiler's top kernels of the
first `--profile-steps` (4) steady full and pruned steps per variant (`<out stem>-profile.md`): what the next
change should target.
The notes give each catrt variant's schedule bound: its own full step for t0 steps and the MAC share
of it for the rest, the fastest any pruned step could make the generation (so which speedup targets
the schedule can reach at all).

Time budget (8 minutes of the lent GPU, an H200 so far): the eager variants of every model run first (pass 1), then the
compiled ones (pass 2, each model rebuilt with the same seed), because compiling dominates (catrt
compiles block by block, one graph per block kind and step kind; whole forwards took 90-100 s per
model on an H200). Variants not
started after `--budget-s` (420 s) are reported as skipped, and the report is rewritten after every
variant, so a run cut short still leaves every finished row. To finish what was skipped, run again
with `--models ... --variants ...` and another `--out`.

`--tiny` runs the same code on the CPU with small configs derived from the same cards (2 blocks,
width 32, 128x128 px, 12 text tokens, 10 steps, t0 4; torch.compile with dynamo's "eager" backend so
compiling takes seconds); CUDA-only measurements (events, memory, the sync guard) read "n/a (cpu)".
The tests run it.

`--reuse-every N` runs the catrt variants with step-level reuse on top (`CATConfig.reuse_every`: after
t0, every N-th step returns the previous prediction and runs no transformer); the pruned-step and
steady-state figures then come from the pruned steps only, and the schedule bound counts the steps
that run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch._dynamo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .` (the GPU machine)
    sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/benchkit.py, also when loaded by path
import benchkit  # noqa: E402
from catrt.notices import quiet_known_notices  # noqa: E402 - light: no torch

quiet_known_notices()  # a command-line program: transformers' torchvision notices say nothing useful here

import diffusers  # noqa: E402

from catrt.config import CATConfig  # noqa: E402
from catrt.errors import ConfigError  # noqa: E402
from catrt.model_cards import MODEL_CARDS, ModelCard  # noqa: E402
from catrt.scheduler import StepKind, plan  # noqa: E402
from catrt.models import family_of  # noqa: E402
from catrt.tokens import Grid  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DEFAULT_MODELS = ("sd3", "pixart-sigma", "sd3.5-large")  # the slowest to compile last: --budget-s cuts it first
VARIANTS = ("diffusers-eager", "diffusers-compile", "catrt-eager", "catrt-graphs", "catrt-compile")  # table order
PASSES = (("diffusers-eager", "catrt-eager", "catrt-graphs"), ("catrt-compile", "diffusers-compile"))  # run order
CAPTURED = ("catrt-graphs", "catrt-compile")  # steps replayed as CUDA graphs on a GPU
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TIMESTEP_SCALE = {"flux": 1.0}  # FluxPipeline passes sigma (the transformer scales it by 1000); others 1000 * sigma
GUIDANCE_SCALE = 7.0
NA_CPU = "n/a (cpu)"
STARTED = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:7.1f}s] {message}", flush=True)


# -- settings ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchkit.new_parser("bench/gpu.py", __doc__)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=sorted(n for n in MODEL_CARDS if n != "reference"),
                        help="published transformer configs to time, random weights")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="what to time")
    parser.add_argument("--tiny", action="store_true", help="CPU, small configs from the same cards (the tests run this)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default 1024; --tiny 128)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 28; --tiny 10)")
    parser.add_argument("--t0", type=int, default=None, help="last full step (default 8; --tiny 4)")
    parser.add_argument("--alpha", type=float, default=0.3, help="fraction of image tokens a pruned step recomputes")
    parser.add_argument("--reuse-every", type=int, default=0,
                        help="catrt variants: after t0, every N-th step reuses the previous prediction (0 = off)")
    parser.add_argument("--dtype", choices=sorted(PRECISIONS), default=None,
                        help="one dtype for every model (default: each model's published precision - SD3 and PixArt "
                             "fp16, SD3.5 and FLUX bf16; --tiny fp32)")
    parser.add_argument("--repeats", type=int, default=None, help="timed generations per variant (default 3; --tiny 2)")
    parser.add_argument("--selection-repeats", type=int, default=20, help="standalone selection calls timed (median)")
    parser.add_argument("--check-steps", type=int, default=4, help="steady pruned steps counted for allocations, and again under the sync guard")
    parser.add_argument("--diffusers-compile", choices=("regional", "whole"), default="regional",
                        help="regional: torch.compile each transformer block (fast to compile); whole: the whole module")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip variants not yet started after this many seconds (default 420 on a GPU, off with --tiny)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile the steady full and pruned steps of each variant (torch.profiler) and write "
                             "the top kernels to <out stem>-profile.md")
    parser.add_argument("--profile-rows", type=int, default=25, help="kernels listed per profile")
    parser.add_argument("--profile-steps", type=int, default=4,
                        help="steady steps of each kind profiled (recording and summing every op of 19 pruned steps of "
                             "SD3.5-large per variant would spend the GPU's time budget on the profiler)")
    parser.add_argument("--out", type=Path, default=None,
                        help="report path (default $OUT/speed-<gpu>.md where $OUT is a folder, else bench/results/speed-<gpu>.md)")
    args = parser.parse_args(argv)
    tiny = args.tiny
    defaults = {"size": (128, 1024), "steps": (10, 28), "t0": (4, 8), "repeats": (2, 3), "budget_s": (0.0, 420.0)}
    for name, (small, full) in defaults.items():  # `is None`: an asked-for 0 is refused below, never replaced
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else full)
    benchkit.check_at_least_one(parser, size=args.size, steps=args.steps, repeats=args.repeats,
                                selection_repeats=args.selection_repeats, check_steps=args.check_steps,
                                profile_rows=args.profile_rows, profile_steps=args.profile_steps)
    benchkit.check_out(parser, args.out)  # the report is first written before any model is built
    benchkit.check_distinct(parser, models=args.models, variants=args.variants)
    if args.size % 16:
        parser.error("--size must be a multiple of 16 (VAE factor 8, patch 2)")
    if not args.budget_s >= 0:
        parser.error(f"--budget-s must be a number of seconds >= 0 (0 = no budget), got {args.budget_s}")
    try:
        cat_config(args).check_steps(args.steps)
    except ConfigError as error:
        parser.error(str(error))
    if not pruned_steps(args):
        parser.error(f"no steady pruned step to time: steps {args.t0 + 2}..{args.steps} are all reused; "
                     "raise --steps or --reuse-every, or lower --t0")
    return args


def catrt_full_steps(args: argparse.Namespace) -> range:
    """The catrt full steps timed: 2..t0-1 (step 1 allocates, step t0 clusters), or step 1 where t0 = 2 (the least) leaves none."""
    return range(2, args.t0) or range(1, 2)


def cat_config(args: argparse.Namespace) -> CATConfig:
    """The pruning settings of every catrt variant (and of the selection and MAC figures)."""
    return CATConfig(alpha=args.alpha, t0=args.t0, reuse_every=args.reuse_every)


def schedule(args: argparse.Namespace) -> list[StepKind]:
    """The catrt variants' step kinds, steps 1..steps in order."""
    return plan(args.steps, args.t0, reuse_every=args.reuse_every)


def pruned_steps(args: argparse.Namespace) -> list[int]:
    """The steady pruned steps (1-based): after the first pruned step (whose selection ran at t0), not reused."""
    kinds = schedule(args)
    return [step for step in range(args.t0 + 2, args.steps + 1) if kinds[step - 1] == "pruned"]


def pick_device(tiny: bool) -> torch.device:
    if tiny:
        return torch.device("cpu")
    if not torch.cuda.is_available():  # a usage mistake, as `catrt generate --device cuda` without CUDA: exit code 2
        print("bench/gpu.py needs a CUDA device; use --tiny to run it on the CPU", file=sys.stderr)
        raise SystemExit(2)
    return torch.device("cuda")


def tiny_config(card: ModelCard, latent: int) -> dict[str, Any]:
    """The card's config at a toy size: 2 blocks of width 32, small text widths, its other options kept."""
    config = dict(card.transformer_config)
    config.update(num_layers=2, num_attention_heads=2, attention_head_dim=16)
    if "sample_size" in config:
        config["sample_size"] = latent
    if card.family == "sd3":
        config.update(joint_attention_dim=48, caption_projection_dim=32, pooled_projection_dim=24,
                      pos_embed_max_size=max(latent // config["patch_size"], 16))
        if config.get("dual_attention_layers"):
            config["dual_attention_layers"] = [0]
    elif card.family == "flux":  # 2 double + 2 single blocks; the rotary axes split the 16-wide heads
        config.update(num_single_layers=2, joint_attention_dim=48, pooled_projection_dim=24, axes_dims_rope=[4, 6, 6])
    else:
        config.update(cross_attention_dim=32, caption_channels=48)
    return config


@dataclass
class ModelSetup:
    """One model as measured: its card with the config it is built from (shrunk under --tiny), and its dtype."""

    card: ModelCard
    dtype: torch.dtype
    latent: int  # latent cells a side

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def family(self) -> str:
        return self.card.family

    @property
    def config(self) -> dict[str, Any]:
        return self.card.transformer_config

    @property
    def text_tokens(self) -> int:
        return self.card.text_tokens

    @property
    def doubles_batch(self) -> bool:
        """Whether guidance stacks [uncond, cond] rows (the family's pipeline spec: SD3, PixArt; not FLUX)."""
        family = family_of(self.family)
        return family.pipelines[family.pipeline_class].doubles_batch({"guidance_scale": GUIDANCE_SCALE})

    @property
    def grid(self) -> Grid:
        """The image token grid: the latent over the card's cells per token (patch size, or FLUX's packing)."""
        side = self.latent // self.card.token_cells
        return Grid(side, side)


def model_setup(name: str, args: argparse.Namespace) -> ModelSetup:
    card = MODEL_CARDS[name]
    latent = args.size // card.vae_scale
    if args.tiny:
        card = dataclasses.replace(card, transformer_config=tiny_config(card, latent), text_tokens=12)
        return ModelSetup(card, PRECISIONS[args.dtype or "fp32"], latent)
    config = dict(card.transformer_config)
    if "sample_size" in config:
        config["sample_size"] = latent
    card = dataclasses.replace(card, transformer_config=config)
    return ModelSetup(card, PRECISIONS[args.dtype or card.precision], latent)


# -- timing, memory, sync ------------------------------------------------------------------------


class Clock:
    """CUDA events on a GPU (no host sync between marks), perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3


def allocation_count(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return int(torch.cuda.memory_stats(device).get("allocation.all.allocated", 0))


@contextlib.contextmanager
def sync_guard(device: torch.device) -> Iterator[None]:
    """Any host synchronisation inside raises (CUDA only); the mode is always restored."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def short_error(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return re.sub(r"\s+", " ", text)[:400]


# -- the denoising loop --------------------------------------------------------------------------


StepFn = Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], torch.Tensor]


class Loop:
    """Latents, conditioning and schedule of one generation, updated in place between steps.

    The call's tensors take the shapes of the family's registered meta call (catrt.models.registry),
    filled with random values: [uncond, cond] rows where the family's guidance doubles the batch
    (SD3, PixArt), one row with the guidance embedding's input where it does not (FLUX-dev).
    """

    def __init__(self, setup: ModelSetup, args: argparse.Namespace, device: torch.device) -> None:
        self.doubled = setup.doubles_batch
        rows = 2 if self.doubled else 1
        self.steps = args.steps
        dtype = setup.dtype
        generator = torch.Generator(device="cpu").manual_seed(0)

        def random_like(meta: torch.Tensor) -> torch.Tensor:
            """Random values of a meta tensor's shape; a batch-1 tensor's row repeated for [uncond, cond]
            (position ids, (T or N, 3), have no batch dimension)."""
            value = torch.randn(*meta.shape, generator=generator).to(device=device, dtype=dtype)
            return value.expand(rows, *meta.shape[1:]).contiguous() if meta.dim() > 1 and meta.shape[0] == 1 else value

        meta_call = family_of(setup.family).meta_call(setup.config, setup.text_tokens, setup.grid)
        self.start = random_like(meta_call.pop("hidden_states"))
        self.latents = torch.empty_like(self.start)  # under guidance rows 0 (uncond) and 1 (cond) stay equal
        self.guided = torch.empty_like(self.start[:1])
        meta_call.pop("timestep")
        self.call_kwargs: dict[str, Any] = {}
        for name, value in meta_call.items():
            if name == "guidance":  # FLUX-dev's distilled guidance: the scale itself, one per row
                self.call_kwargs[name] = torch.full((rows,), GUIDANCE_SCALE, device=device, dtype=torch.float32)
            elif isinstance(value, torch.Tensor):
                self.call_kwargs[name] = random_like(value)
            else:
                self.call_kwargs[name] = value
        sigmas = [1.0 - i / self.steps for i in range(self.steps + 1)]
        self.dts = [sigmas[i + 1] - sigmas[i] for i in range(self.steps)]
        scale = TIMESTEP_SCALE.get(setup.family, 1000.0)
        self.timesteps = torch.tensor([[scale * s] * rows for s in sigmas[:-1]], device=device)  # (steps, rows)

    def update(self, prediction: torch.Tensor, index: int) -> None:
        """x <- x + dt * (u + g * (c - u)) under guidance, else x + dt * v; on the latents' channels
        (PixArt's prediction also carries its variance channels)."""
        channels = self.latents.shape[1] if self.latents.dim() == 4 else self.latents.shape[-1]
        velocity = prediction[:, :channels] if prediction.dim() == 4 else prediction[..., :channels]
        if self.doubled:
            uncond, cond = velocity[0:1], velocity[1:2]
            torch.sub(cond, uncond, out=self.guided)
            self.guided.mul_(GUIDANCE_SCALE).add_(uncond)
            velocity = self.guided
        self.latents.add_(velocity, alpha=self.dts[index])


@dataclass
class Generation:
    step_ms: list[float]
    total_ms: float
    first_prediction: torch.Tensor | None = None
    final_finite: bool | None = None


def run_generation(
    step: StepFn,
    loop: Loop,
    clock: Clock,
    keep_first: bool = False,
    before: Callable[[int], None] | None = None,
    after: Callable[[int], None] | None = None,
) -> Generation:
    """One generation of `loop.steps` transformer calls; `before`/`after` get the 1-based step number."""
    loop.latents.copy_(loop.start)
    first = None
    marks = [clock.mark()]
    for index in range(loop.steps):
        if before is not None:
            before(index + 1)
        prediction = step(loop.latents, loop.timesteps[index], loop.call_kwargs)
        if keep_first and index == 0:
            first = prediction.detach().clone()
        loop.update(prediction, index)
        marks.append(clock.mark())
        if after is not None:
            after(index + 1)
    clock.sync()
    step_ms = [clock.ms(a, b) for a, b in zip(marks, marks[1:])]
    finite = bool(torch.isfinite(loop.latents).all()) if keep_first else None
    return Generation(step_ms, clock.ms(marks[0], marks[-1]), first, finite)


# -- variants ------------------------------------------------------------------------------------


@dataclass
class Row:
    """One table row; None = not measured for this variant, str = a reason or an error."""

    model: str
    variant: str
    full_ms: float | str | None = None
    pruned_ms: float | str | None = None
    selection_ms: float | str | None = None
    generation_ms: float | str | None = None
    peak_gib: float | str | None = None
    allocs_per_step: float | str | None = None
    host_sync: str | None = None
    warmup_s: float | str | None = None
    error: str | None = None
    skipped: str | None = None  # why the variant was not started (the --budget-s ran out): no error, not measured
    done: bool = False  # measured, failed or skipped; a report written before then shows the row as not run yet
    notes: list[str] = field(default_factory=list)
    profiles: dict[str, str] = field(default_factory=dict)  # --profile: step kind -> kernel table


@dataclass
class Variant:
    """What a measured variant needs: a fresh step function per generation, and whether it prunes."""

    new_generation: Callable[[], StepFn]
    prunes: bool
    notes: list[str] = field(default_factory=list)


def diffusers_step(transformer: torch.nn.Module) -> StepFn:
    def step(hidden_states: torch.Tensor, timestep: torch.Tensor, call_kwargs: dict[str, Any]) -> torch.Tensor:
        return transformer(hidden_states=hidden_states, timestep=timestep, return_dict=False, **call_kwargs)[0]

    return step


def compile_backend_name(tiny: bool) -> str:
    """Under --tiny, torch.compile uses dynamo's "eager" backend: the same tracing, no codegen.

    Inductor's code generation for these graphs takes minutes on a 2-core CPU; the GPU run uses inductor.
    """
    return "eager" if tiny else "inductor"


def diffusers_compiled(transformer: torch.nn.Module, how: str, tiny: bool) -> Variant:
    """torch.compile of the diffusers transformer; regional = each block compiled in place (FLUX: its
    double- and single-stream blocks, the modules diffusers' `compile_repeated_blocks` names)."""
    backend = compile_backend_name(tiny)
    if how == "regional":
        for blocks in ("transformer_blocks", "single_transformer_blocks"):
            for block in getattr(transformer, blocks, ()):
                block.compile(dynamic=False, backend=backend)
        step = diffusers_step(transformer)
    else:
        step = diffusers_step(torch.compile(transformer, dynamic=False, backend=backend))
    note = "torch.compile (inductor, default mode) of each transformer block" if how == "regional" else "torch.compile of the whole transformer"
    return Variant(lambda: step, prunes=False, notes=[note + (" [--tiny: dynamo 'eager' backend]" if tiny else "")])


def catrt_variant(adapter: Any, setup: ModelSetup, args: argparse.Namespace, compiled: bool, graphs: bool,
                  device: torch.device) -> Variant:
    """CATRuntime over the eager adapter or compiled step functions, each step replayed as one CUDA graph
    when `graphs` (on CUDA; the eager adapter then shows what capture alone gains, without inductor).

    The runtime's persistent buffers are shared by every generation of the variant, as a server
    would keep them; one CATRuntime per generation.
    """
    from catrt.runtime import CATRuntime

    from catrt.engines.compile import compile_step_functions
    from catrt.step_state import RuntimeBuffers

    config = cat_config(args)
    notes: list[str] = []
    functions = compile_step_functions(adapter, compile_backend_name(args.tiny)) if compiled else None
    if compiled and args.tiny:
        notes.append("[--tiny: dynamo 'eager' backend]")
    if graphs and device.type != "cuda":
        notes.append("[cpu: no CUDA graphs]")
    extra: dict[str, Any] = {"buffers": RuntimeBuffers(), "cuda_graphs": graphs and device.type == "cuda"}

    def new_generation() -> StepFn:
        return CATRuntime(adapter, config, steps=args.steps, guidance=setup.doubles_batch, functions=functions, grid=setup.grid, **extra)

    return Variant(new_generation, prunes=True, notes=notes)


def measure_variant(row: Row, variant: Variant, loop: Loop, args: argparse.Namespace, device: torch.device) -> Generation:
    """Warm-up generation, timed generations, then (pruning variants) allocations and the sync guard."""
    clock = Clock(device)
    started = time.perf_counter()
    warm = run_generation(variant.new_generation(), loop, clock, keep_first=True)
    row.warmup_s = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed = [run_generation(variant.new_generation(), loop, clock) for _ in range(args.repeats)]
    row.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else NA_CPU
    full_steps = catrt_full_steps(args) if variant.prunes else range(1, args.steps + 1)
    # catrt: pruned steps after the first (whose selection ran at t0)
    row.full_ms = statistics.median(g.step_ms[s - 1] for g in timed for s in full_steps)
    if variant.prunes:
        row.pruned_ms = statistics.median(g.step_ms[s - 1] for g in timed for s in pruned_steps(args))
    row.generation_ms = statistics.median(g.total_ms for g in timed)
    if variant.prunes:
        check_steady_state(row, variant, loop, args, device, clock)
    if args.profile:  # an extra: its failure (a profiler that cannot trace graph replays) is a note, not the row's error
        try:
            row.profiles = profile_steps(variant, loop, args, device, clock)
        except Exception as error:
            log(f"{row.model} {row.variant}: profiling failed\n{traceback.format_exc()}")
            row.notes.append(f"--profile failed: {short_error(error)}")
    return warm


def profile_steps(variant: Variant, loop: Loop, args: argparse.Namespace, device: torch.device, clock: Clock) -> dict[str, str]:
    """torch.profiler's top kernels over the first `--profile-steps` steady full steps, and (pruning variants) as many
    steady pruned steps, one more generation each: where a variant's step time goes, for the next change. Steady
    steps repeat one another, so a few give the same shares as all of them at a fraction of the profiler's cost."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    windows = {"full": (2, min(args.t0 - 1, 1 + args.profile_steps))}
    if variant.prunes:
        windows["pruned"] = (args.t0 + 2, min(args.steps, args.t0 + 1 + args.profile_steps))
    tables = {}
    for kind, (first, last) in windows.items():
        if first > last:
            continue
        profiler = profile(activities=activities)
        running = []  # the profiler while it runs: a generation that fails inside the window must not leave it on

        def before(step: int) -> None:
            if step == first:
                clock.sync()
                profiler.start()
                running.append(profiler)

        def after(step: int) -> None:
            if step == last:
                clock.sync()
                running.pop().stop()

        try:
            run_generation(variant.new_generation(), loop, clock, before=before, after=after)
        finally:
            for started in running:
                started.stop()
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort, row_limit=args.profile_rows)
        tables[f"{kind} steps {first}-{last}"] = table
    return tables


def prepare_profiling(args: argparse.Namespace, device: torch.device) -> None:
    """With --profile on CUDA, before any step is captured: torch's own workaround for CUPTI first initialised after a
    CUDA graph was captured (pytorch#75504; needed on CUDA < 12 by torch's note, harmless after), since every profiled
    catrt-graphs / catrt-compile window replays graphs its warm-up captured before the profiler ever ran, and a crash
    there is no Python error that --profile's note could catch. A torch without the helper, or a helper that fails,
    profiles as before (logged): an extra never stops the measurements."""
    if not (args.profile and device.type == "cuda"):
        return
    try:
        from torch.profiler._utils import _init_for_cuda_graphs

        _init_for_cuda_graphs()
    except Exception as error:
        log(f"--profile: torch's CUPTI set-up for CUDA graphs did not run ({short_error(error)}); profiling without it")


def check_steady_state(row: Row, variant: Variant, loop: Loop, args: argparse.Namespace, device: torch.device, clock: Clock) -> None:
    """One more generation: count allocations over steady pruned steps, then run more under the sync guard.

    Each window runs from its first to its last pruned step (reused steps between them run too) and
    counts its pruned steps.
    """
    steady = pruned_steps(args)
    count = max(1, min(args.check_steps, len(steady) // 2))
    alloc_steps, sync_steps = steady[:count], steady[count : 2 * count] or steady[-1:]
    alloc_window = range(alloc_steps[0], alloc_steps[-1] + 1)
    sync_window = range(sync_steps[0], sync_steps[-1] + 1)
    counts: dict[str, int | None] = {}
    guard = contextlib.ExitStack()

    def before(step: int) -> None:
        if step == alloc_window.start:
            counts["start"] = allocation_count(device)
        if step == sync_window.start:
            guard.enter_context(sync_guard(device))

    def after(step: int) -> None:
        if step == alloc_window.stop - 1:
            counts["end"] = allocation_count(device)
        if step == sync_window.stop - 1:
            guard.close()

    try:
        run_generation(variant.new_generation(), loop, clock, before=before, after=after)
    except Exception as error:  # a sync under the guard raises here
        guard.close()
        log(f"{row.model} {row.variant}: steady-state check failed\n{traceback.format_exc()}")
        row.host_sync = "FAIL" if device.type == "cuda" else "error"
        row.notes.append(f"steady-state check (steps {sync_window.start}-{sync_window.stop - 1}): {short_error(error)}")
    else:
        row.host_sync = f"pass ({len(sync_steps)} steps)" if device.type == "cuda" else NA_CPU
    finally:
        guard.close()
    if device.type != "cuda":
        row.allocs_per_step = NA_CPU
    elif counts.get("start") is not None and counts.get("end") is not None:
        row.allocs_per_step = (counts["end"] - counts["start"]) / len(alloc_steps)


def selection_ms(adapter: Any, setup: ModelSetup, args: argparse.Namespace, device: torch.device) -> tuple[float, float | None]:
    """Median time of one later CAT selection alone at the real shapes, as the runtime makes it: run
    eagerly, and (on CUDA) replayed as a CUDA graph, as it runs inside a captured pruned step.

    The runtime scores the conditional half of its output cache in float32 (the cast is timed too)
    against a float32 reference, with float32 staleness and int64 labels and step numbers.
    """
    from catrt.selection import select_cat_step

    config = cat_config(args)
    num = setup.grid.num_tokens
    k = config.num_selected(num)
    n_clusters = min(config.n_clusters, num)
    width = adapter.token_out_channels
    generator = torch.Generator(device="cpu").manual_seed(1)
    rows = 2 if setup.doubles_batch else 1
    output_cache = torch.randn(rows, num, width, generator=generator).to(device, setup.dtype)  # [uncond, cond] or one row
    reference = torch.randn(1, num, width, generator=generator).to(device)
    labels = torch.randint(0, n_clusters, (1, num), generator=generator).to(device)
    staleness = torch.rand(1, num, generator=generator).to(device)
    last_computed = torch.randint(1, args.t0 + 1, (1, num), generator=generator).to(device)

    def select() -> torch.Tensor:
        return select_cat_step(output_cache[-1:].float(), reference, labels, staleness, last_computed, k=k,
                               n_clusters=n_clusters, magnitude_fraction=config.magnitude_fraction)

    clock = Clock(device)

    def median_ms(run: Callable[[], Any]) -> float:
        for _ in range(3):
            run()
        times = []
        for _ in range(args.selection_repeats):
            start = clock.mark()
            run()
            end = clock.mark()
            clock.sync()
            times.append(clock.ms(start, end))
        return statistics.median(times)

    eager = median_ms(select)
    if device.type != "cuda":
        return eager, None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as capture requires
        select()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        select()
    return eager, median_ms(graph.replay)


def mac_ratios(setup: ModelSetup, args: argparse.Namespace) -> tuple[str, float]:
    """The MAC ratios of this config (counted on the meta device): a line for the report, and the pruned
    step's MACs over the full step's (what `schedule_bound` scales a measured full step by)."""
    from catrt.macs import transformer_macs

    with torch.device("meta"):
        meta = family_of(setup.family).adapter.transformer_class.from_config(setup.config).eval()
    report = transformer_macs(meta, setup.card, args.size, args.size, cat_config(args), args.steps)
    share = report.pruned_step / report.full_step
    line = (f"N {report.num_tokens}, k {report.k}; MACs pruned/full step {share:.3f}, "
            f"{args.steps}-step schedule {report.schedule_ratio:.3f} (ideal speedup {1 / report.schedule_ratio:.2f}x)")
    return line, share


def build_transformer(setup: ModelSetup, device: torch.device) -> torch.nn.Module:
    """Random weights made on the device in the target dtype (no fp32 copy of an 8B model)."""
    cls = family_of(setup.family).adapter.transformer_class
    torch.manual_seed(0)
    try:
        with torch.device(device), default_dtype(setup.dtype):
            model = cls.from_config(setup.config)
    except (TypeError, RuntimeError) as error:  # a default dtype some init cannot take: fp32, then cast
        log(f"{setup.name}: building in {setup.dtype} failed ({short_error(error)}); building in fp32")
        with torch.device(device):
            model = cls.from_config(setup.config)
    return model.to(dtype=setup.dtype).eval().requires_grad_(False)


# -- one model -----------------------------------------------------------------------------------


def out_of_time(args: argparse.Namespace) -> bool:
    return bool(args.budget_s) and time.monotonic() - STARTED > args.budget_s


def measure_model(name: str, variants: list[str], args: argparse.Namespace, device: torch.device, report: Report) -> None:
    """Build one model and measure `variants` of it; each variant's failure becomes its row's error."""
    setup = model_setup(name, args)
    rows = {row.variant: row for row in report.rows if row.model == name}
    info = report.model_notes.setdefault(name, [])
    firsts = report.first_predictions.setdefault(name, {})
    first_visit = not info
    transformer = adapter = loop = None
    try:
        if first_visit:
            try:
                line, report.mac_shares[name] = mac_ratios(setup, args)
                info.append(line)
            except Exception as error:  # informative only
                log(f"{name}: MAC count failed: {short_error(error)}")
        log(f"{name}: building the transformer ({setup.dtype}, {setup.config['num_layers']} blocks) on {device}")
        started = time.perf_counter()
        with torch.no_grad():
            transformer = build_transformer(setup, device)  # seeded: the same weights on every visit
        built = time.perf_counter() - started
        if first_visit:
            params = sum(p.numel() for p in transformer.parameters())
            weights = sum(p.numel() * p.element_size() for p in transformer.parameters()) / 2**30
            count = f"{params / 1e9:.2f} B" if params >= 1e8 else f"{params / 1e6:.2f} M"
            info.append(f"{count} parameters, {weights:.2f} GiB of weights in {str(setup.dtype).removeprefix('torch.')}, built in {built:.1f} s")
            log(f"{name}: {info[-1]}")
        loop = Loop(setup, args, device)
        from catrt.models import make_adapter

        adapter = make_adapter(transformer)
    except Exception as error:
        log(f"{name}: setup failed\n{traceback.format_exc()}")
        for variant in variants:
            rows[variant].error = f"setup: {short_error(error)}"
            rows[variant].done = True
        del transformer, adapter, loop
        free_memory(device)
        report.write()
        return

    catrt_rows = [rows[v] for v in VARIANTS if v.startswith("catrt") and v in rows]
    if any(v.startswith("catrt") for v in variants) and all(row.selection_ms is None for row in catrt_rows):
        try:
            with torch.no_grad():
                eager_ms, captured_ms = selection_ms(adapter, setup, args, device)
            log(f"{name}: selection {eager_ms:.3f} ms eager" + (f", {captured_ms:.3f} ms as a CUDA graph" if captured_ms else ""))
            for row in catrt_rows:
                row.selection_ms = captured_ms if captured_ms is not None and row.variant in CAPTURED else eager_ms
        except Exception as error:
            log(f"{name}: selection timing failed\n{traceback.format_exc()}")
            for row in catrt_rows:
                row.selection_ms = f"error: {short_error(error)}"

    for variant_name in variants:
        row = rows[variant_name]
        if out_of_time(args):
            row.skipped, row.done = f"not started: over the --budget-s {args.budget_s:g} s time budget", True
            log(f"{name} {variant_name}: {row.skipped}")
            continue
        log(f"{name} {variant_name}: warm-up generation, then {args.repeats} timed")
        variant = None
        try:
            with torch.no_grad():
                if variant_name == "diffusers-eager":
                    variant = Variant(lambda: diffusers_step(transformer), prunes=False)
                elif variant_name == "diffusers-compile":
                    variant = diffusers_compiled(transformer, args.diffusers_compile, args.tiny)
                else:
                    variant = catrt_variant(adapter, setup, args, variant_name == "catrt-compile", variant_name in CAPTURED,
                                            device)
                row.notes.extend(variant.notes)
                warm = measure_variant(row, variant, loop, args, device)
            firsts[variant_name] = warm.first_prediction
            if warm.final_finite is False:
                row.notes.append("final latents of the warm-up generation are not finite (random weights)")
            log(f"{name} {variant_name}: " + ", ".join(f"{k} {v}" for k, v in summary(row).items()))
        except Exception as error:
            log(f"{name} {variant_name}: failed\n{traceback.format_exc()}")
            row.error = short_error(error)
        finally:
            row.done = True
            with contextlib.suppress(Exception):
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode(0)
            del variant
            free_memory(device)
        report.write()

    del transformer, adapter, loop
    with contextlib.suppress(Exception):
        torch.compiler.reset()  # frees compiled graphs (and any CUDA-graph pools they hold)
    free_memory(device)
    if device.type == "cuda":
        log(f"{name}: freed; {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB still allocated")
    report.write()


def summary(row: Row) -> dict[str, str]:
    keys = ("full_ms", "pruned_ms", "generation_ms", "peak_gib", "allocs_per_step", "host_sync", "warmup_s")
    return {key: fmt(getattr(row, key)) for key in keys if getattr(row, key) is not None}


# -- the report ----------------------------------------------------------------------------------


def fmt(value: float | str | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}f}"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def default_out(device: torch.device, tiny: bool) -> Path:
    """$OUT/speed-<gpu>.md where $OUT is a folder (the lent GPU machine returns only what is written there),
    else bench/results/speed-<gpu>.md, or a free variant of it when that file is committed already."""
    if tiny:
        return RESULTS / "tmp" / "gpu-tiny.md"
    slug = benchkit.device_slug(device_name(device))
    lent = os.environ.get("OUT")
    if lent and Path(lent).is_dir():
        return Path(lent) / f"speed-{slug}.md"
    path = RESULTS / f"speed-{slug}.md"
    if path.exists() and committed(path):
        path = path.with_name(f"{path.stem}-{time.strftime('%Y%m%d-%H%M%S')}.md")
    return path


def committed(path: Path) -> bool:
    """Whether git tracks `path`; without git (a copied tree), any existing file counts as committed."""
    try:
        result = subprocess.run(["git", "ls-files", "--error-unmatch", str(path)], cwd=ROOT, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return True
    return result.returncode == 0 or b"not a git repository" in result.stderr


def first_step_agreement(firsts: dict[str, torch.Tensor]) -> list[str]:
    """Step 1 is a full step everywhere: each variant's first prediction against diffusers eager's."""
    reference = firsts.get("diffusers-eager")
    if reference is None:
        return []
    reference = reference.float()
    scale = reference.abs().max().item() or 1.0
    return [
        f"{variant}: step-1 prediction vs diffusers eager, max |diff| / max |ref| = "
        f"{(first.float() - reference).abs().max().item() / scale:.2e}"
        for variant, first in firsts.items()
        if variant != "diffusers-eager" and first is not None
    ]


class Report:
    def __init__(self, args: argparse.Namespace, device: torch.device, path: Path) -> None:
        self.args, self.device, self.path = args, device, path
        self.rows = [Row(model, variant) for model in args.models for variant in VARIANTS if variant in args.variants]
        self.model_notes: dict[str, list[str]] = {}
        self.first_predictions: dict[str, dict[str, torch.Tensor]] = {}
        self.mac_shares: dict[str, float] = {}  # model -> pruned step's MACs / full step's
        self.finished = False  # set before the last write: until then the report says it is partial

    def header(self) -> list[str]:
        args, device = self.args, self.device
        cuda = device.type == "cuda"
        name = device_name(device)
        versions = f"torch {torch.__version__}" + (f" (CUDA {torch.version.cuda})" if cuda else "") + f", diffusers {diffusers.__version__}"
        dtypes = ", ".join(f"{m} {str(model_setup(m, args).dtype).removeprefix('torch.')}" for m in args.models)
        title = "tiny configs on the CPU (a smoke run of bench/gpu.py, not a benchmark)" if args.tiny else name
        timing = "CUDA events between steps" if cuda else "perf_counter between steps"
        return [
            f"# Transformer speed: {title}",
            "",
            f"Device: {name}; {versions}; Python {sys.version.split()[0]}. Written by `python bench/gpu.py"
            + (" --tiny" if args.tiny else "") + "`.",
            "",
            f"Settings: {args.size}x{args.size} px (latent {args.size // 8}x{args.size // 8}), one prompt with guidance "
            f"(scale {GUIDANCE_SCALE}: batch 2 [uncond, cond]; FLUX batch 1, the scale an input), {args.steps} steps, t0 {args.t0}, alpha {args.alpha}; {dtypes}; random weights "
            f"built on the device from the published configs{' (shrunk: 2 blocks, width 32, 12 text tokens)' if args.tiny else ''}, "
            "random text conditioning of the real shapes, fixed linear timesteps, in-place guided Euler update; no text "
            "encoders, VAE or scheduler.",
            "",
            f"Method: per variant one untimed warm-up generation (compile, CUDA-graph capture: the *warm-up* column), then "
            f"{args.repeats} timed generations ({timing}; a step includes the loop's in-place latent update, a few "
            f"microseconds). *Full* / *pruned step* = median of those steps "
            f"(catrt full: {self.full_span()}; pruned: {self.pruned_span()}, each including the next step's "
            f"selection); *{args.steps} steps* = median whole loop (diffusers: {args.steps} full steps; catrt: "
            f"{self.catrt_schedule()}, KMeans at t0 included); *speedup* over diffusers eager. *Selection* = "
            f"`select_cat_step` alone at the real shapes (float32 scores, as the runtime), median of {args.selection_repeats}, "
            f"run eagerly (catrt eager) or replayed as a CUDA graph (catrt graphs, catrt compile; eager on the CPU). *Peak* = "
            f"`max_memory_allocated` over the timed generations (weights included). *Allocs/step* = change of "
            f"`allocation.all.allocated` over {args.check_steps} steady pruned steps, per step. *Host sync* = "
            f"{args.check_steps} further steady pruned steps under `torch.cuda.set_sync_debug_mode(\"error\")`. "
            f"diffusers compile: {'each transformer block compiled (regional)' if args.diffusers_compile == 'regional' else 'whole module compiled'}"
            f", inductor default mode; catrt graphs: the eager adapter, each step one CUDA graph; catrt compile: "
            f"`compile_step_functions(adapter)` with the runtime's CUDA graphs"
            + ("; --tiny: dynamo's 'eager' backend, no CUDA graphs." if args.tiny else "."),
            "",
        ]

    def table(self) -> list[str]:
        steps = self.args.steps
        lines = [
            f"| model | variant | full step (ms) | pruned step (ms) | selection (ms) | {steps} steps (ms) | speedup vs diffusers eager "
            "| peak memory (GiB) | allocs / pruned step | host sync | warm-up (s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in self.rows:
            if row.error or row.skipped or not row.done:
                status = "error" if row.error else "skipped" if row.skipped else "not run yet"
                lines.append(f"| {row.model} | {row.variant} | {status} | | | | | | | | |")
                continue
            cells = [
                fmt(row.full_ms), fmt(row.pruned_ms) if row.pruned_ms is not None else "n/a", fmt(row.selection_ms, 3),
                fmt(row.generation_ms, 1), fmt(self.speedup(row)),
                fmt(row.peak_gib), fmt(row.allocs_per_step, 1), fmt(row.host_sync), fmt(row.warmup_s, 1),
            ]
            lines.append(f"| {row.model} | {row.variant} | " + " | ".join(cells) + " |")
        return lines

    def notes(self) -> list[str]:
        lines = ["", "## Notes", ""]
        for model, notes in self.model_notes.items():
            for note in notes:
                lines.append(f"- {model}: {note}")
            lines += [f"- {model}: {line}" for line in first_step_agreement(self.first_predictions.get(model, {}))]
        for row in self.rows:
            if row.error:
                lines.append(f"- {row.model} {row.variant}: **error** {row.error}")
            if row.skipped:
                lines.append(f"- {row.model} {row.variant}: skipped, {row.skipped}")
            for note in row.notes:
                lines.append(f"- {row.model} {row.variant}: {note}")
            if isinstance(row.selection_ms, float) and isinstance(row.pruned_ms, float) and row.pruned_ms > 0:
                lines.append(f"- {row.model} {row.variant}: selection = {row.selection_ms / row.pruned_ms:.1%} of a pruned step")
            bound = self.schedule_bound(row)
            if bound:
                lines.append(f"- {row.model} {row.variant}: {bound}")
        elapsed = time.monotonic() - STARTED
        if self.finished:
            lines.append(f"- total run time {elapsed:.0f} s")
        else:
            pending = sum(not row.done for row in self.rows)
            lines.append(f"- **partial report**, written {elapsed:.0f} s into the run: {pending} row(s) *not run yet*; a "
                         "run that ends here (killed, out of device time) never measured them")
        return lines

    def speedup(self, row: Row) -> str | None:
        """diffusers eager's generation time over the row's, as "1.40x"; None until both are measured (derived when
        the report is written, so a report written mid-model has the speedups of the rows measured so far)."""
        baseline = next((r for r in self.rows if r.model == row.model and r.variant == "diffusers-eager"), None)
        if baseline is None or not isinstance(baseline.generation_ms, float) or not isinstance(row.generation_ms, float):
            return None
        return f"{baseline.generation_ms / row.generation_ms:.2f}x"

    def catrt_schedule(self) -> str:
        """The catrt variants' steps by kind, e.g. "8 full + 20 pruned" or "8 full + 14 pruned + 6 reused"."""
        kinds = schedule(self.args)
        text = f"{kinds.count('full')} full + {kinds.count('pruned')} pruned"
        return text + (f" + {kinds.count('reused')} reused (--reuse-every {self.args.reuse_every})" if kinds.count("reused") else "")

    def full_span(self) -> str:
        steps = catrt_full_steps(self.args)
        return f"steps {steps.start}..{steps.stop - 1}" if len(steps) > 1 else f"step {steps.start}"

    def pruned_span(self) -> str:
        if not self.args.reuse_every:
            return f"steps {self.args.t0 + 2}..{self.args.steps}"
        return f"the {len(pruned_steps(self.args))} pruned steps among {self.args.t0 + 2}..{self.args.steps}"

    def schedule_bound(self, row: Row) -> str | None:
        """How far a catrt variant is from what its own full step allows: a pruned step at the MAC share of
        the full step, t0 full steps, and the 28-step speedup over diffusers eager that would give.

        No rewrite of the pruned step beats this bound (the full steps and the MAC share are fixed by
        t0 and alpha), so it says which speedup targets the schedule can reach at all.
        """
        share = self.mac_shares.get(row.model)
        baseline = next((r for r in self.rows if r.model == row.model and r.variant == "diffusers-eager"), None)
        if share is None or not isinstance(row.full_ms, float) or not isinstance(row.pruned_ms, float) or row.pruned_ms <= 0:
            return None
        kinds = schedule(self.args)
        full, pruned = kinds.count("full"), kinds.count("pruned")
        ideal_pruned = share * row.full_ms
        bound = full * row.full_ms + pruned * ideal_pruned  # reused steps run no transformer
        text = (f"pruned step = {row.pruned_ms / row.full_ms:.3f} of its full step (MACs {share:.3f}: "
                f"{ideal_pruned / row.pruned_ms:.0%} of the MAC-proportional time); bound at this full step: {full} x "
                f"{row.full_ms:.2f} + {pruned} x {ideal_pruned:.2f} = {bound:.1f} ms")
        if baseline is not None and isinstance(baseline.generation_ms, float):
            text += f", {baseline.generation_ms / bound:.2f}x over diffusers eager"
        return text

    def write(self) -> None:
        """The report as it stands, each file replaced whole (a kill mid-write keeps the last one written)."""
        benchkit.write_text(self.path, "\n".join(self.header() + self.table() + self.notes()) + "\n")
        profiled = [row for row in self.rows if row.profiles]
        if profiled:
            lines = [f"# Profiles: {self.path.name}", "", "torch.profiler over steady steps of one more generation per variant "
                     "(`bench/gpu.py --profile`); sorted by self device time (CPU time on the CPU).", ""]
            for row in profiled:
                for window, table in row.profiles.items():
                    lines += [f"## {row.model} {row.variant}: {window}", "", "```", table.rstrip(), "```", ""]
            benchkit.write_text(self.profile_path, "\n".join(lines))

    @property
    def profile_path(self) -> Path:
        return self.path.with_name(f"{self.path.stem}-profile.md")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = pick_device(args.tiny)
    if args.tiny:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    for name in ("recompile_limit", "cache_size_limit"):  # every model recompiles the shared adapter code
        with contextlib.suppress(Exception):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)
    path = args.out or default_out(device, args.tiny)
    log(f"bench/gpu.py on {device_name(device)}: torch {torch.__version__}, diffusers {diffusers.__version__}; "
        f"models {' '.join(args.models)}; variants {' '.join(args.variants)}; report -> {path}")
    report = Report(args, device, path)
    report.write()
    prepare_profiling(args, device)
    # Pass 1 measures the eager variants of every model, pass 2 the compiled ones (rebuilding each
    # model with the same seed): if compiling runs past --budget-s, only compiled rows are lost.
    for number, group in enumerate(PASSES, 1):
        for name in args.models:
            variants = [variant for variant in group if variant in args.variants]
            if variants:
                log(f"pass {number}/{len(PASSES)}: {name}: {', '.join(variants)}")
                measure_model(name, variants, args, device, report)
    report.finished = True
    report.write()
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
