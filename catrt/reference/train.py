"""Train the reference model with rectified flow, resumably, for the steps a wall-clock budget holds.

    python -m catrt.reference.train --minutes 60                      # into reference-training/
    python -m catrt.reference.train --minutes 60 --publish            # and then ship the weights

Everything goes into the output folder (`--out`, default `reference-training/`): `checkpoint.pt`
(written every few minutes and at the end; a later run with the same `--out` resumes from it),
`weights/` (the EMA weights in the package's format: `load_reference_pipeline(weights_dir=...)`,
`bench/quality.py --weights ...`) and `samples.png`. The shipped weights in `catrt/reference/weights/`
are written only with `--publish`, which copies the final `weights/` files there.

SD3's convention: x_s = (1 - s) x0 + s noise, the transformer sees timestep 1000 s and
predicts the velocity noise - x0, which is what `FlowMatchEulerDiscreteScheduler` integrates.
The text encoder trains jointly; captions are dropped to "" 10% of the time so that
classifier-free guidance works. The budget counts training time across resumed runs.

The learning rate follows the step count, never the clock, so a run's weights do not depend on the machine's speed:
it decays over `--max-steps`, or, without it, over the steps the time budget holds at the pace of a few trial steps
measured once at the start (logged, and kept in the checkpoint for resumed runs); `--max-steps N` with that N repeats
the schedule on any machine. A run ends at its schedule's last step, never at the clock (a run the budget cut short
where the steps ran slower than the trial ones, or `--max-steps N` cut on a slow machine, trained other weights than the
schedule's), so a time budget is kept as closely as the trial steps foretell the run's pace, and `--max-steps` leaves
`--minutes` no part. The shipped weights were trained (`--minutes 60`) before, when it decayed over the clock.
"""

from __future__ import annotations

from catrt.notices import quiet_known_notices  # stdlib only

if __name__ == "__main__":  # a command-line program: transformers' torchvision notices say nothing useful here
    quiet_known_notices()  # before the imports below, which import transformers

import argparse
import collections
import copy
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image
from safetensors.torch import save as safetensors_bytes
from torch import nn
from tqdm.auto import tqdm

from catrt import atomic_files
from catrt.checks import output_folder, path_is
from catrt.cli import OneLineParser
from catrt.errors import CatrtError, ConfigError, echo_path
from catrt.reference import data
from catrt.reference.checksums import CHECKSUM_FILE, verify_files, write_checksums
from catrt.reference.text import token_ids
from catrt.reference.writes import written
from catrt.reference.pipeline import (
    CONFIG_FILE,
    TEXT_ENCODER_FILE,
    TRANSFORMER_FILE,
    WEIGHTS_DIR,
    ReferencePipeline,
    build_modules,
    default_configs,
)

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path("reference-training")
CHECKPOINT_FILE = "checkpoint.pt"
# What save_weights writes and --publish copies: the weights, then their digests (copied last: a copy cut short
# leaves files the record refuses, never a mixed model that loads).
WEIGHT_FILES = (TRANSFORMER_FILE, TEXT_ENCODER_FILE, CONFIG_FILE, CHECKSUM_FILE)
CHECKED_FILES = WEIGHT_FILES[:-1]
# The longest --minutes: a year and a day. 1e308 overflowed the schedule's step count (a traceback after the trial steps).
MAX_MINUTES = 60 * 24 * 366
# The largest --lr: AdamW moves each weight by about the learning rate a step, so past 1 (the weights start near 0.02,
# the default is 1e-3) the first step wrecks the model; 1e308 trained NaNs for the whole budget and saved them.
MAX_LR = 1.0
# The most --samples: drawn after all the training, each rendered and held first (about 4 KB and 1.3 ms each here: 10
# million were 40 GB and 3.5 hours before the one pipeline call that draws them all). 1024 is a 512 x 8192 grid.
MAX_SAMPLES = 1024


@dataclass
class TrainConfig:
    """Hyper-parameters; the defaults are what the shipped weights were trained with."""

    minutes: float = 60.0
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_fraction: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    seed: int = 0
    checkpoint_minutes: float = 4.0
    # the schedule's steps (counted across resumed runs): decay over and stop at them, whatever the clock;
    # 0 = as many as the budget holds at the measured pace
    max_steps: int = 0
    bf16: bool = True  # autocast matmuls to bfloat16: ~25% faster per step on a 1-thread CPU


@torch.no_grad()
def dit_init(transformer: nn.Module) -> None:
    """DiT's initialisation (xavier linears, zeroed modulation and output layers): every
    block starts as the identity, the usual recipe for training adaLN transformers."""
    for module in transformer.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    proj = transformer.pos_embed.proj
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    for linear in (transformer.time_text_embed.timestep_embedder.linear_1,
                   transformer.time_text_embed.timestep_embedder.linear_2):
        nn.init.normal_(linear.weight, std=0.02)
    zeroed = [transformer.norm_out.linear, transformer.proj_out]
    for block in transformer.transformer_blocks:
        zeroed += [block.norm1.linear, block.norm1_context.linear]
    for linear in zeroed:
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)


class Trainer:
    """Models, optimiser, EMA copies and RNG state: everything a checkpoint must restore."""

    def __init__(self, cfg: TrainConfig) -> None:
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.configs = default_configs()
        modules = build_modules(self.configs)
        dit_init(modules["transformer"])
        self.tokenizer = modules["tokenizer"]
        self.models = nn.ModuleDict({"transformer": modules["transformer"], "text_encoder": modules["text_encoder"]})
        self.ema = copy.deepcopy(self.models).requires_grad_(False)
        self.optimizer = torch.optim.AdamW(
            self.models.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay
        )
        self.rng = np.random.default_rng(cfg.seed)
        self.step = 0
        self.elapsed = 0.0  # training seconds, summed over resumed runs
        self.pace: float | None = None  # seconds a step, measured once (`measure_pace`) where no --max-steps sets the schedule

    def state_dict(self) -> dict:
        return {
            "models": self.models.state_dict(), "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(), "rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(), "step": self.step, "elapsed": self.elapsed, "pace": self.pace,
        }

    def load_state_dict(self, state: dict) -> None:
        self.models.load_state_dict(state["models"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        self.step, self.elapsed = state["step"], state["elapsed"]
        # a checkpoint of before the pace was kept: its own steps' pace
        self.pace = state.get("pace") or (self.elapsed / self.step if self.step else None)

    def total_steps(self) -> int:
        """The schedule's length: `max_steps`, else the steps the time budget holds at the measured pace."""
        if self.cfg.max_steps:
            return self.cfg.max_steps
        if self.pace is None:
            raise RuntimeError("the pace is measured (measure_pace) before a schedule without max_steps is read")
        return max(1, math.floor(60.0 * self.cfg.minutes / self.pace))

    def learning_rate(self) -> float:
        """Linear warm-up, then cosine decay over the schedule's steps: a function of the step count only (over the
        clock, two runs of one command gave other weights on machines of other speeds, and on one machine too)."""
        warmup = min(1.0, (self.step + 1) / self.cfg.warmup_steps)
        progress = min(1.0, self.step / self.total_steps())
        floor = self.cfg.min_lr_fraction
        return self.cfg.lr * warmup * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))

    def batch(self) -> tuple[torch.Tensor, list[str]]:
        """Fresh renders every step; some captions dropped to the unconditional prompt."""
        samples = [data.random_sample(self.rng) for _ in range(self.cfg.batch_size)]
        drop = self.rng.random(len(samples)) < self.cfg.caption_dropout
        captions = ["" if dropped else s.caption for s, dropped in zip(samples, drop, strict=True)]
        return data.to_tensor([s.image for s in samples]), captions

    def loss(self, x0: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Velocity-prediction MSE at logit-normal noise levels, as SD3 trains."""
        sigma = torch.sigmoid(torch.randn(x0.shape[0]))
        noise = torch.randn_like(x0)
        noisy = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.bf16):
            tokens, pooled = self.models["text_encoder"](token_ids(self.tokenizer, captions))
            velocity = self.models["transformer"](
                hidden_states=noisy, encoder_hidden_states=tokens, pooled_projections=pooled,
                timestep=sigma * 1000, return_dict=False,
            )[0]
        return torch.nn.functional.mse_loss(velocity.float(), noise - x0)

    def train_step(self) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate()
        loss = self.loss(*self.batch())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.models.parameters(), 1.0)
        self.optimizer.step()
        self.update_ema()
        self.step += 1
        return loss.item()

    @torch.no_grad()
    def update_ema(self) -> None:
        """EMA with a short warm-up so early weights are not frozen into the average."""
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        for ema, live in zip(self.ema.parameters(), self.models.parameters(), strict=True):
            ema.lerp_(live, 1 - decay)


def measure_pace(trainer: Trainer, steps: int = 3) -> float:
    """Seconds a training step takes here: the mean of `steps` steps of a throwaway copy after one untimed step (it
    allocates), which leaves the trainer and the RNGs as they were, so the run's own steps are those of any pace."""
    trial = copy.deepcopy(trainer)
    trial.pace = 1.0  # any: the trial's learning rate is thrown away with it
    seconds = []
    with torch.random.fork_rng(devices=[]):
        trial.train_step()
        for _ in range(steps):
            start = time.perf_counter()
            trial.train_step()
            seconds.append(time.perf_counter() - start)
    return sum(seconds) / steps


def save_checkpoint(trainer: Trainer, path: Path) -> None:
    """Write atomically, so an interrupted save never leaves a broken checkpoint to resume from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Through a Python file: a failed write is then its OSError (ENOSPC), where torch.save of a path raised a
    # RuntimeError that does not say why ("unexpected pos ...", "file write failed").
    with written(path), atomic_files.replacing(path) as temporary, open(temporary, "wb") as file:
        torch.save(trainer.state_dict(), file)


def save_weights(trainer: Trainer, out: Path) -> None:
    """The EMA weights as float16 safetensors (small enough to ship) plus configs and vocab, each file replaced whole
    (a run stopped mid-write leaves the earlier weights, which their digests, written last, still match)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, file in (("transformer", TRANSFORMER_FILE), ("text_encoder", TEXT_ENCODER_FILE)):
        tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in trainer.ema[name].state_dict().items()}
        # serialised here, written by Python: safetensors' own write failed as a SafetensorError, not an OSError
        with written(out / file):
            atomic_files.write_bytes(out / file, safetensors_bytes(tensors))
    with written(out / CONFIG_FILE):
        atomic_files.write_text(out / CONFIG_FILE, json.dumps(trainer.configs, indent=1) + "\n")
    with written(out / CHECKSUM_FILE):
        write_checksums(out, CHECKED_FILES)


def sample_grid(trainer: Trainer, path: Path, n: int = 64, steps: int = 28) -> None:
    """A PNG of EMA samples for held-out-seed captions (8 per row), to look at."""
    pipe = ReferencePipeline(
        transformer=trainer.ema["transformer"].eval(), text_encoder=trainer.ema["text_encoder"].eval(),
        tokenizer=trainer.tokenizer, scheduler=FlowMatchEulerDiscreteScheduler(**trainer.configs["scheduler"]),
    )
    pipe.set_progress_bar_config(disable=True)
    captions = [s.caption for s in data.generate(n, seed=12345)]
    pixels = pipe(captions, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                  output_type="latent").images
    images = data.to_uint8(pixels)
    rows = [np.concatenate(list(images[i : i + 8]), axis=1) for i in range(0, n, 8)]
    grid = Image.fromarray(np.concatenate(rows, axis=0)).resize((512, 64 * len(rows)), Image.NEAREST)
    with written(path), atomic_files.replacing(path) as temporary:  # whole, as `written` says: never a half image
        grid.save(temporary, format="PNG")
    with written(path.with_suffix(".txt")):
        atomic_files.write_text(path.with_suffix(".txt"), "\n".join(captions) + "\n")


def publish(weights: Path, target: Path | None = None) -> None:
    """Copy the trained weight files into the package folder (default `WEIGHTS_DIR`; each file replaced
    atomically, their digests last); the probe and any other file there are left alone. The files are checked
    against their training record first: damaged ones are never shipped."""
    target = WEIGHTS_DIR if target is None else target
    verify_files(weights, CHECKED_FILES)
    kept = f"(the trained weights stay in {echo_path(weights)})"
    for name in WEIGHT_FILES:
        with written(target / name, f"free some space there {kept}", f"make {echo_path(target)} writable for this user {kept}"):
            atomic_files.write_bytes(target / name, (weights / name).read_bytes())


def train(cfg: TrainConfig, out: Path, resume: bool = True, progress: bool | None = None) -> Trainer:
    """Train the schedule's steps (`cfg.max_steps`, else what `cfg.minutes` hold at the measured pace), resuming from
    `out/checkpoint.pt` if it is there; checkpoint every few minutes and at the end, then write the EMA
    weights to `out/weights/`. `progress`: tqdm's `disable` rule inverted (None = only on a terminal)."""
    checkpoint = out / CHECKPOINT_FILE
    trainer = Trainer(cfg)
    if resume and checkpoint.exists():
        trainer.load_state_dict(torch.load(checkpoint, weights_only=False))
        logger.info("resumed from %s at step %d (%.1f min)", checkpoint, trainer.step, trainer.elapsed / 60)
    if not cfg.max_steps and trainer.pace is None:
        trainer.pace = measure_pace(trainer)
    total = trainer.total_steps()
    if not cfg.max_steps:
        logger.info("learning-rate schedule: %d steps, what %g min hold at %.3g s a step measured here; --max-steps %d "
                    "repeats it on any machine", total, cfg.minutes, trainer.pace, total)
    last_save, losses = trainer.elapsed, collections.deque(maxlen=100)

    bar = tqdm(total=total, initial=min(trainer.step, total), unit="step", desc="training",
               disable=None if progress is None else not progress, dynamic_ncols=True,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} steps{postfix}")
    bar.set_postfix_str(f"{trainer.elapsed / 60:.1f} min", refresh=False)
    with bar:
        while trainer.step < total:  # never the clock: one that stopped it made the weights the machine's
            start = time.perf_counter()
            losses.append(trainer.train_step())
            seconds = time.perf_counter() - start
            trainer.elapsed += seconds
            bar.set_postfix_str(f"{trainer.elapsed / 60:.1f} min, loss {np.mean(losses):.4f} (last {len(losses)}), "
                                f"lr {trainer.learning_rate():.2e}", refresh=False)
            bar.update(1)
            if bar.disable and trainer.step % 100 == 0:  # no bar (not a terminal, e.g. a log file): a line instead
                logger.info("step %d  loss %.4f  lr %.2e  %.1f min", trainer.step, np.mean(losses),
                            trainer.learning_rate(), trainer.elapsed / 60)
            if trainer.elapsed - last_save > 60.0 * cfg.checkpoint_minutes:
                save_checkpoint(trainer, checkpoint)
                last_save = trainer.elapsed
        bar.refresh()
    save_checkpoint(trainer, checkpoint)
    save_weights(trainer, out / "weights")
    return trainer


def _check_publishable(parser: argparse.ArgumentParser, shipped: Path) -> None:
    """Refuse --publish before training where the shipped weights (`shipped`'s folder) cannot be replaced (an installed
    package's read-only folder, whose files may be writable; another user's files in a sticky one): it failed with a
    traceback after all the training."""
    fix = "train without --publish (the weights stay in --out's weights/)"
    for name in WEIGHT_FILES:
        refusal = atomic_files.file_refusal(shipped.parent / name, fix)
        if refusal is not None:
            parser.error(f"--publish cannot replace the shipped weights in {shipped.parent}: {refusal}")


def _check_out_files(parser: argparse.ArgumentParser, out: Path, samples: bool) -> None:
    """Refuse, before training, an `out` (made) whose files the run could not replace at its checkpoints and end:
    another user's checkpoint.pt in a sticky folder (`--out /tmp`), a writable one in a folder that takes no new file,
    a folder at a file's name, a file at weights/ (resumed from, a checkpoint.pt folder failed at once in torch.load).
    A folder not made yet (weights/) is made by the run, in `out`, which was checked writable."""
    names = [CHECKPOINT_FILE, *(f"weights/{name}" for name in WEIGHT_FILES),
             *(("samples.png", "samples.txt") if samples else ())]
    if os.path.lexists(out / "weights") and not path_is(out / "weights", "folder"):  # its mkdir failed after all the training
        parser.error(f"--out {echo_path(out)}: its weights is not a folder, where the run writes the trained weights; "
                     "move it away or train into another --out")
    for name in names:
        if (out / name).parent.is_dir():
            refusal = atomic_files.file_refusal(out / name, "train into another --out")
            if refusal is not None:
                parser.error(f"--out {echo_path(out)}: its {name} cannot be replaced: {refusal}")


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def main(argv: list[str] | None = None) -> Trainer:
    parser = OneLineParser(  # a mistake is one line naming it, not argparse's usage block
        prog="python -m catrt.reference.train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog=f"The shipped weights ({WEIGHTS_DIR}) are only written with --publish.",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="output folder: checkpoint.pt (resumed from), weights/, samples.png")
    parser.add_argument("--minutes", type=float, default=TrainConfig.minutes,
                        help="training-time budget, counted across resumed runs: without --max-steps, the schedule is "
                             "the steps it holds at the pace measured at the start, and the run ends at them")
    parser.add_argument("--max-steps", type=int, default=TrainConfig.max_steps,
                        help="the learning-rate schedule's steps, counted across resumed runs: decay over them and stop "
                             "there, whatever --minutes says (0 = as many as --minutes hold at the pace measured at the "
                             "start)")
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="images per step")
    parser.add_argument("--lr", type=float, default=TrainConfig.lr, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed,
                        help="seed of a fresh run (a resumed run restores its RNG)")
    parser.add_argument("--checkpoint-minutes", type=float, default=TrainConfig.checkpoint_minutes,
                        help="training minutes between checkpoints")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (leave a core free)")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="resume from OUT/checkpoint.pt if it exists (--no-resume starts over and overwrites it)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=TrainConfig.bf16,
                        help="autocast matmuls to bfloat16 (--no-bf16: float32)")
    parser.add_argument("--samples", type=int, default=64,
                        help="EMA samples drawn into OUT/samples.png at the end (a multiple of 8; 0 = none)")
    parser.add_argument("--publish", action="store_true",
                        help=f"copy the final weights into the package folder ({WEIGHTS_DIR}), "
                             "replacing the shipped ones")
    args = parser.parse_args(argv)
    if _inside(args.out, WEIGHTS_DIR):
        parser.error(f"--out {args.out} is inside the shipped weights folder {WEIGHTS_DIR}; "
                     "train into another folder and use --publish to copy the weights there")
    if args.samples % 8 or args.samples < 0:
        parser.error(f"--samples must be a multiple of 8 (rows of 8) >= 0, not {args.samples}")
    if args.samples > MAX_SAMPLES:
        parser.error(f"--samples must be at most {MAX_SAMPLES} (drawn in one pipeline call after the training), got "
                     f"{args.samples}")
    for flag, value in (("--minutes", args.minutes), ("--lr", args.lr), ("--checkpoint-minutes", args.checkpoint_minutes)):
        if not (math.isfinite(value) and value > 0):  # a budget of 0 trains nothing (and --publish would ship it)
            parser.error(f"{flag} must be a finite number > 0, got {value}")
    if args.lr > MAX_LR:
        parser.error(f"--lr must be in (0, {MAX_LR:g}] (AdamW moves each weight by about lr a step; the default is "
                     f"{TrainConfig.lr:g}), got {args.lr:g}")
    if args.minutes > MAX_MINUTES:
        parser.error(f"--minutes must be in (0, {MAX_MINUTES}] (at most 366 days), got {args.minutes:g}")
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--threads", args.threads, 1),
                               ("--max-steps", args.max_steps, 0), ("--seed", args.seed, 0)):
        if value < least:
            parser.error(f"{flag} must be an integer >= {least}, got {value}")
    try:  # made now: a path the OS refuses (under a file, a name too long) is one line, not a traceback later
        output_folder(args.out, f"--out {echo_path(args.out)}", "checkpoint.pt, weights/ and samples.png", "out")
    except ConfigError as error:
        parser.error(str(error))
    _check_out_files(parser, args.out, bool(args.samples))
    if args.publish:
        _check_publishable(parser, WEIGHTS_DIR / TRANSFORMER_FILE)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(minutes=args.minutes, batch_size=args.batch_size, lr=args.lr, seed=args.seed, bf16=args.bf16,
                      checkpoint_minutes=args.checkpoint_minutes, max_steps=args.max_steps)
    try:
        trainer, message = _train_and_write(cfg, args)
    except CatrtError as error:  # a file the disk refused (the earlier one kept), damaged weights --publish would ship:
        # one line, as the refusals above, but exit 1: no flag was wrong
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    print(message, flush=True)
    return trainer


def _train_and_write(cfg: TrainConfig, args: argparse.Namespace) -> tuple[Trainer, str]:
    """Train, draw the samples, publish if asked; the trainer and the line saying what was written where."""
    trainer = train(cfg, args.out, resume=args.resume)
    message = (f"trained {trainer.step} steps in {trainer.elapsed / 60:.1f} min; "
               f"checkpoint {args.out / CHECKPOINT_FILE}; weights in {args.out / 'weights'}")
    if not args.max_steps:  # the schedule the time budget made: repeatable by its step count on any machine
        message += f"; a schedule of {trainer.total_steps()} steps (--max-steps {trainer.total_steps()} repeats it)"
    if args.samples:
        sample_grid(trainer, args.out / "samples.png", n=args.samples)
        message += f"; samples in {args.out / 'samples.png'}"
    if args.publish:
        publish(args.out / "weights")
        message += f"; published to {WEIGHTS_DIR}"
    return trainer, message


if __name__ == "__main__":
    main()
