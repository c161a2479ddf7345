"""`catrt compare`: every variant's image against the unpruned image of the same prompt and seed.

For each prompt and seed the unpruned pipeline makes the reference image; each variant (a token rule
with its schedule, as a `CATConfig`) makes its own with the same seed. Per image: PSNR and SSIM
against the reference, CLIP score against the prompt (with a CLIP model), the MAC ratio of the
schedule the run took (from its trace, so adaptive reuse is counted as it ran) and the wall time.
`run_comparison` is the measuring loop (bench/frontier.py uses it too); `write_outputs` writes
report.md, metrics.csv, grid.png and the images.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import itertools
import math
import os
import shutil
import signal
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from catrt import metrics
from catrt.checks import path_is
from catrt.config import CATConfig
from catrt.errors import PATH_ECHO_LIMIT, ConfigError, echo
from catrt.generation import GenerationRequest, generate_image
from catrt.macs import StepMacs, step_macs
from catrt.pipeline import accelerate
from catrt.publish import held, scratch_folder
from catrt.runtime import CATRuntime

UNPRUNED = "unpruned"
#: The files a run moves into `--out` beside images/, report.md last (so a report.md there heads a whole set).
OUTPUT_FILES = ("metrics.csv", "grid.png", "report.md")
CSV_FIELDS = ("prompt_index", "prompt", "seed", "variant", "psnr", "ssim", "clip", "mac_ratio", "seconds", "reused_steps")


@dataclass(frozen=True)
class Variant:
    """One column of the comparison: a label and its settings; `config` None runs the unpruned pipeline.
    `runtime` replaces the runtime class (bench/ baselines that are no rule of catrt's, such as an oracle)."""

    label: str
    config: CATConfig | None
    runtime: type[CATRuntime] | None = None


@dataclass(frozen=True)
class Sample:
    """One prompt and seed under one variant."""

    prompt_index: int
    prompt: str
    seed: int
    variant: str
    psnr: float
    ssim: float
    clip: float | None
    mac_ratio: float
    seconds: float
    reused_steps: int


@dataclass(frozen=True)
class Comparison:
    """What a run measured: the samples, and the images by (prompt index, seed, variant)."""

    variants: list[Variant]
    samples: list[Sample]
    images: dict[tuple[int, int, str], Image.Image]

    def values(self, variant: str, name: str) -> list[float]:
        """One metric of one variant, in (prompt, seed) order: paired across variants."""
        return [getattr(s, name) for s in self.samples if s.variant == variant]


def run_comparison(
    pipe: Any,
    prompts: list[str],
    seeds: list[int],
    variants: list[Variant],
    steps: int,
    *,
    height: int | None = None,
    width: int | None = None,
    guidance_scale: float | None = None,
    clip: metrics.ClipScorer | None = None,
    progress: bool = True,
    paired: bool = False,
    warmup: bool = True,
) -> Comparison:
    """Generate and score every (prompt, seed) under the unpruned pipeline and each variant (with
    `paired`, prompt i with seed i only).

    With `warmup` each variant first runs one untimed generation (buffers, first-call costs), so every
    timed generation is a warm one.
    """
    metrics.require_skimage()
    pipe.set_progress_bar_config(disable=True)
    columns = [Variant(UNPRUNED, None), *variants]
    runners = {v.label: _runner(pipe, v) for v in columns}
    inputs = _first_call_inputs(pipe, prompts[0], seeds[0], steps, height, width, guidance_scale)
    counts: dict[float, StepMacs] = {}
    samples: list[Sample] = []
    images: dict[tuple[int, int, str], Image.Image] = {}
    pairs = list(zip(enumerate(prompts), seeds, strict=True)) if paired else list(itertools.product(enumerate(prompts), seeds))
    for variant in columns if warmup else []:  # before the bar: a variant refused at its call fails on a clean line
        generate_image(runners[variant.label], _request(prompts[0], seeds[0], steps, height, width, guidance_scale))
    bar = tqdm(total=len(pairs) * len(columns), desc="compare", unit="image", disable=not progress)
    try:
        for (index, prompt), seed in pairs:
            reference = None
            for variant in columns:
                runner = runners[variant.label]
                image, seconds = generate_image(runner, _request(prompt, seed, steps, height, width, guidance_scale))
                pixels = np.asarray(image.convert("RGB"))
                reference = pixels if reference is None else reference
                if variant.config is None:
                    ratio, reused = 1.0, 0
                else:
                    alpha = variant.config.alpha
                    if alpha not in counts:
                        counts[alpha] = step_macs(pipe.transformer, *inputs, variant.config)
                    ratio = counts[alpha].traced_ratio(runner.last_trace)
                    reused = sum(record.kind == "reused" for record in runner.last_trace)
                samples.append(Sample(
                    index, prompt, seed, variant.label, metrics.psnr(pixels, reference), metrics.ssim(pixels, reference),
                    None if clip is None else clip.score(image, prompt), ratio, seconds, reused,
                ))
                images[(index, seed, variant.label)] = image
                bar.update()
    except BaseException:
        bar.leave = False  # an error (or Ctrl-C) mid-run prints its line where the bar was
        raise
    finally:
        bar.close()
    return Comparison(columns, samples, images)


def _runner(pipe: Any, variant: Variant) -> Any:
    """The pipeline itself for the unpruned column, else an accelerated pipeline that keeps its trace."""
    if variant.config is None:
        return pipe
    runner = accelerate(pipe, dataclasses.replace(variant.config, trace=True))
    if variant.runtime is not None:
        runner.runtime_class = variant.runtime
    return runner


def _request(prompt: str, seed: int, steps: int, height: int | None, width: int | None, guidance: float | None) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, steps=steps, seed=seed, height=height, width=width, guidance_scale=guidance)


def _first_call_inputs(
    pipe: Any, prompt: str, seed: int, steps: int, height: int | None, width: int | None, guidance: float | None
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The transformer's inputs at the first step of one unpruned generation, to count MACs at that shape."""
    captured: dict[str, Any] = {}

    def keep(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not captured:
            captured.update(kwargs)
            if args:
                captured.setdefault("hidden_states", args[0])

    hook = pipe.transformer.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        generate_image(pipe, _request(prompt, seed, 2, height, width, guidance))
    finally:
        hook.remove()
    latents, timestep = captured.pop("hidden_states"), captured.pop("timestep")
    captured.pop("return_dict", None)
    timestep = torch.as_tensor(timestep, device=latents.device)
    return latents, timestep.expand(latents.shape[0]) if timestep.ndim == 0 else timestep, captured


# -- outputs -----------------------------------------------------------------------------------


def write_outputs(comparison: Comparison, out: Path, header: list[str], grid_rows: int = 8) -> None:
    """report.md, metrics.csv, grid.png and every image as images/<prompt>-s<seed>-<variant>.png.

    All are written into a hidden folder inside `out` first and moved into place once every one is written
    (report.md last), so a failed write (a full disk) or Ctrl-C leaves no half set among an earlier run's files.
    """
    out.mkdir(parents=True, exist_ok=True)
    staging, lock = scratch_folder(out, ".catrt-compare-")  # a killed run's folder is removed by the next run
    try:
        (staging / "images").mkdir()
        for (index, seed, label), image in comparison.images.items():
            image.save(staging / "images" / f"{index:03d}-s{seed}-{_file_label(label)}.png")
        write_csv(comparison, staging / "metrics.csv")
        (staging / "report.md").write_text("\n".join([*header, "", *report_lines(comparison)]) + "\n")
        image_grid(comparison, staging / "grid.png", grid_rows)
        (out / "images").mkdir(exist_ok=True)
        with held(out), _signals_deferred():  # another compare into `out` moves its set before or after this one
            for image in (staging / "images").iterdir():
                os.replace(image, out / "images" / image.name)
            for name in OUTPUT_FILES:
                os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if lock is not None:
            os.close(lock)


def check_out(out: Path) -> None:
    """Refuse, before the run, an `out` (made and writable) whose files this run could not replace: another user's
    report.md in a sticky folder (`--out /tmp`), a writable report in a folder that takes no new file, or an images/
    this user cannot write into; a folder where a file goes, a file where images/ goes. Each failed only at the final
    moves, after minutes of generating (the moves before it done: a half set). An OSError of
    the check itself is raised, for the caller's "cannot be written" line."""
    from catrt import atomic_files

    named = f"--out {echo(str(out), PATH_ECHO_LIMIT)}"
    for name in OUTPUT_FILES:
        refusal = atomic_files.replace_refusal(out / name, "give another --out", file=True)
        if refusal is not None:
            raise ConfigError(f"{named}: its {name} cannot be replaced: {refusal}", field="out", value=str(out))
    images = out / "images"
    if os.path.lexists(images) and not path_is(images, "folder"):  # its mkdir failed after the run (FileExistsError)
        raise ConfigError(f"{named}: its images is not a folder, where the run moves its images; move it away or give "
                          "another --out", field="out", value=str(out))
    if path_is(images, "folder") and not os.access(images, os.W_OK | os.X_OK):
        raise ConfigError(f"{named}: its folder images/ is not writable, where the run moves its images; make it "
                          "writable or give another --out", field="out", value=str(out))


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM held back (in the main thread) until the block is done, so moving the results into place
    is never stopped halfway; a signal that came meanwhile is raised again right after, to its own handler.

    Python runs signal handlers in the main thread whichever thread the OS hands the signal to, so the handlers are
    swapped for ones that only note it (a thread signal mask would miss signals given to torch's threads).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    previous = {signum: signal.signal(signum, lambda number, frame: came.append(number))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        if came:
            signal.raise_signal(came[0])


def _file_label(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in label)


def write_csv(comparison: Comparison, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for sample in comparison.samples:
            row = dataclasses.asdict(sample)
            row["clip"] = "" if sample.clip is None else f"{sample.clip:.4f}"
            writer.writerow(row)


def report_lines(comparison: Comparison) -> list[str]:
    """The means table and the paired differences, as markdown."""
    has_clip = any(s.clip is not None for s in comparison.samples)
    labels = [v.label for v in comparison.variants]
    unpruned_seconds = metrics.mean_interval(comparison.values(UNPRUNED, "seconds")).mean
    lines = [
        "Means over prompts x seeds with 95% intervals (Student t). PSNR and SSIM compare each image with the "
        "unpruned image of the same prompt and seed (8-bit pixels; inf / 1 = identical). The MAC ratio is the "
        "transformer's MACs over the unpruned pipeline's, from each run's trace; seconds are wall time per image "
        "(the whole pipeline call).",
        "",
        "| variant | PSNR (dB) | SSIM | " + ("CLIP score | " if has_clip else "") + "MAC ratio | seconds | speed-up |",
        "|---|---|---|" + ("---|" if has_clip else "") + "---|---|---|",
    ]
    for label in labels:
        cell = {name: metrics.mean_interval(comparison.values(label, name)) for name in ("ssim", "mac_ratio", "seconds")}
        clip = f"{metrics.mean_interval(comparison.values(label, 'clip')).format(2)} | " if has_clip else ""
        speedup = unpruned_seconds / cell["seconds"].mean if cell["seconds"].mean > 0 else math.nan
        lines.append(
            f"| {label} | {metrics.psnr_cell(comparison.values(label, 'psnr'))} | {cell['ssim'].format(4)} | {clip}{cell['mac_ratio'].format(3)} | "
            f"{cell['seconds'].format(3)} | {speedup:.2f}x |"
        )
    pruned = labels[1:]
    if len(pruned) >= 2:
        lines += ["", "Paired differences (row minus column variant, same prompt and seed; 95% intervals; "
                  "an interval that excludes 0 is a difference these samples show):", "",
                  "| A - B | PSNR (dB) | SSIM |" + (" CLIP score |" if has_clip else ""),
                  "|---|---|---|" + ("---|" if has_clip else "")]
        for a, b in itertools.combinations(pruned, 2):
            cells = [_difference(comparison, a, b, name, digits) for name, digits in (("psnr", 2), ("ssim", 4))]
            if has_clip:
                cells.append(_difference(comparison, a, b, "clip", 2))
            lines.append(f"| {a} - {b} | " + " | ".join(cells) + " |")
    if has_clip:
        lines += ["", "CLIP score against the unpruned image's score, paired:", "", "| variant | CLIP difference |", "|---|---|"]
        lines += [f"| {label} | {_difference(comparison, label, UNPRUNED, 'clip', 2)} |" for label in pruned]
    return lines


def _difference(comparison: Comparison, a: str, b: str, name: str, digits: int) -> str:
    difference = metrics.paired_difference(comparison.values(a, name), comparison.values(b, name))
    return "n/a (inf)" if difference is None else difference.format(digits)


#: Width in pixels of grid.png's first column, which names each row's prompt (as metrics.csv numbers it) and seed;
#: wider where a row's `prompt <index>, seed <seed>` line needs it (a seed of 19 digits), so no seed shows cut short.
ROW_LABEL_WIDTH = 112


def image_grid(comparison: Comparison, path: Path, rows: int, cell: int = 128) -> None:
    """PNG: one row per (prompt, seed), at most `rows`, named in its first column; the unpruned image first, then
    each variant."""
    keys = list(dict.fromkeys((s.prompt_index, s.seed) for s in comparison.samples))[:rows]
    prompts = {s.prompt_index: s.prompt for s in comparison.samples}
    labels = [v.label for v in comparison.variants]
    label_height = 30
    font = ImageFont.load_default()  # FreeType's where Pillow has it (10.1 on), else a bitmap font of Latin-1 only
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max([ROW_LABEL_WIDTH, *(math.ceil(measure.textlength(_row_heading(index, seed), font=font)) + 4
                                          for index, seed in keys)])
    grid = Image.new("RGB", (label_width + cell * len(labels), label_height + cell * len(keys)), "white")
    draw = ImageDraw.Draw(grid)
    for row, (index, seed) in enumerate(keys):
        text = _row_label(index, seed, prompts[index], label_width // 6)
        draw.text((2, label_height + row * cell + 2), _drawable(text, font), fill="black", font=font)
    for col, label in enumerate(labels):
        left = label_width + col * cell
        draw.text((left + 2, 2), _drawable(_wrap(label, cell // 6), font), fill="black", font=font)
        for row, (index, seed) in enumerate(keys):
            image = comparison.images[(index, seed, label)].convert("RGB")
            grid.paste(image.resize((cell, cell), Image.NEAREST), (left, label_height + row * cell))
    grid.save(path)


def _drawable(text: str, font: Any) -> str:
    """`text` as `font` draws it: Pillow's bitmap font (no FreeType, or Pillow 10.0) encodes Latin-1 only and raised
    on any other character of a prompt, at the end of the run, losing every output; those characters show as '?'."""
    return text if isinstance(font, ImageFont.FreeTypeFont) else text.encode("latin-1", "replace").decode("latin-1")


def _row_label(index: int, seed: int, prompt: str, width: int, lines: int = 8) -> str:
    """`prompt <index>, seed <seed>` and the prompt's first words, wrapped to `width` characters, at most `lines` lines."""
    words = textwrap.wrap(prompt, width, max_lines=lines - 1, placeholder=" ...")
    return "\n".join([_row_heading(index, seed), *words])


def _row_heading(index: int, seed: int) -> str:
    return f"prompt {index}, seed {seed}"


def _wrap(text: str, width: int) -> str:
    """Break a label into two lines at a space near `width` characters."""
    if len(text) <= width or " " not in text:
        return text
    cut = text.rfind(" ", 0, width + 1)
    cut = cut if cut > 0 else text.find(" ")
    return text[:cut] + "\n" + text[cut + 1 :]


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines are skipped (a UTF-8 byte order mark, as Windows editors write, is no text)."""
    if not path_is(path, "file"):
        raise ConfigError(f"--prompts {echo(str(path), PATH_ECHO_LIMIT)} is not a file; give a text file with one prompt per line",
                          field="prompts", value=str(path))
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise ConfigError(f"--prompts {echo(str(path), PATH_ECHO_LIMIT)} is not UTF-8 text", field="prompts", value=str(path)) from None
    if not prompts:
        raise ConfigError(f"--prompts {echo(str(path), PATH_ECHO_LIMIT)} has no prompts; write one per line", field="prompts", value=str(path))
    return prompts

