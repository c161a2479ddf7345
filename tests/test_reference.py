"""The reference model kit: procedural data, the shipped pipeline and the attribute probe."""

from __future__ import annotations

import errno
import hashlib
import re
import logging
import os
import shutil
from collections.abc import Iterator
from typing import Any
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from catrt.errors import ConfigError
from catrt.reference import data, train
from catrt.reference.pipeline import WEIGHTS_DIR, ReferencePipeline, load_reference_pipeline
from catrt.reference.probe import attribute_accuracy, classify, load_probe, reference_accuracy
from catrt.reference.text import SPECIAL_TOKENS, caption_vocabulary, token_ids, word_tokenizer


@pytest.mark.parametrize(("n", "seed", "message"), [
    (-1, 0, "generate.n must be an integer >= 0, got -1"),
    (2.5, 0, "generate.n must be an integer >= 0, got 2.5"),
    (True, 0, "generate.n must be an integer >= 0, got True"),
    (3, -1, "generate.seed must be an integer >= 0, got -1"),
    (3, "a", "generate.seed must be an integer >= 0, got 'a'"),
])
def test_generate_refuses_a_count_or_seed_that_is_no_whole_number(n: object, seed: object, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        data.generate(n, seed)  # type: ignore[arg-type]


def test_generate_takes_numpy_integers_and_zero() -> None:
    assert data.generate(0, 1) == []
    assert [s.caption for s in data.generate(np.int64(3), np.int64(5))] == [s.caption for s in data.generate(3, 5)]


def test_generate_is_deterministic_per_seed() -> None:
    first, again, other = data.generate(16, seed=3), data.generate(16, seed=3), data.generate(16, seed=4)
    assert [s.caption for s in first] == [s.caption for s in again]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(first, again, strict=True))
    assert [s.caption for s in first] != [s.caption for s in other]
    assert not np.array_equal(np.stack([s.image for s in first]), np.stack([s.image for s in other]))


@pytest.mark.parametrize("sample", data.generate(40, seed=11), ids=lambda s: s.caption)
def test_caption_matches_rendered_image(sample: data.Sample) -> None:
    for word in (sample.shape, sample.colour, sample.size, sample.position, sample.background):
        assert word in sample.caption
    assert sample.colour != sample.background
    image = sample.image.astype(int)
    foreground = np.any(image != np.array(data.BACKGROUNDS[sample.background]), axis=-1)
    ys, xs = np.nonzero(foreground)
    cell = data.IMAGE_SIZE / 3
    assert (int(ys.mean() // cell), int(xs.mean() // cell)) == data.grid_cell(sample.position)
    colours, counts = np.unique(image[foreground], axis=0, return_counts=True)
    assert tuple(colours[counts.argmax()]) == data.COLOURS[sample.colour]


def test_large_shapes_cover_more_than_small() -> None:
    attrs = data.Attributes("circle", "red", "small", "center", "black")
    small = data.render(attrs).any(-1).sum()
    large = data.render(data.Attributes("circle", "red", "large", "center", "black")).any(-1).sum()
    assert large > 1.5 * small


def test_tokenizer_pads_and_handles_empty_and_unknown_words(caplog: pytest.LogCaptureFixture) -> None:
    tokenizer = word_tokenizer(caption_vocabulary(), max_length=16)
    pad, unk, cls = (SPECIAL_TOKENS.index(token) for token in SPECIAL_TOKENS)
    ids = token_ids(tokenizer, ["", "a red zebra"])
    assert ids.shape == (2, 16) and ids.dtype == torch.long
    assert ids[0, 0] == ids[1, 0] == cls and (ids[0, 1:] == pad).all()
    assert ids[1, 3] == unk
    vocab = caption_vocabulary()
    # Words are runs of a-z after lower-casing, as the model was trained: digits and punctuation only separate them.
    words = token_ids(tokenizer, "A RED,circle!! 42 on-blue")[0, :6].tolist()
    assert words == [cls, *(vocab.index(word) for word in ("a", "red", "circle", "on", "blue"))]
    with caplog.at_level(logging.WARNING, logger="catrt.reference.text"):
        long = token_ids(tokenizer, "red " * 20)
    assert long[0].tolist() == [cls] + [vocab.index("red")] * 15 and "prompt truncated to 16 tokens" in caplog.text


@pytest.fixture(scope="module")
def pipe() -> ReferencePipeline:
    torch.manual_seed(0)
    pipe = load_reference_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_loads_offline_and_generates_pil(pipe: ReferencePipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = load_reference_pipeline()
    offline.set_progress_bar_config(disable=True)
    images = offline(["a large red circle in the center on a black background"] * 2, num_inference_steps=4).images
    assert len(images) == 2 and all(isinstance(i, Image.Image) and i.size == (32, 32) for i in images)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_pipeline_calls_transformer_once_per_step(pipe: ReferencePipeline, guidance_scale: float) -> None:
    batches = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        latents = pipe(["a small blue square in the top left on a white background"], num_inference_steps=5,
                       guidance_scale=guidance_scale, output_type="latent",
                       generator=torch.Generator().manual_seed(0)).images
    finally:
        handle.remove()
    assert latents.shape == (1, 3, 32, 32) and torch.isfinite(latents).all()
    assert batches == [2 if guidance_scale > 1 else 1] * 5


def test_text_encoder_embeds_the_empty_prompt(pipe: ReferencePipeline) -> None:
    tokens, pooled = pipe.text_encoder(token_ids(pipe.tokenizer, ["", "a small red circle in the top left on a blue background"]))
    assert tokens.shape == (2, 16, pipe.transformer.config.joint_attention_dim)
    assert pooled.shape == (2, pipe.transformer.config.pooled_projection_dim)
    assert torch.isfinite(tokens).all() and torch.isfinite(pooled).all()


def test_pipeline_accepts_explicit_latents(pipe: ReferencePipeline) -> None:
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    kwargs = {"prompt": "a large green cross in the center on a gray background", "num_inference_steps": 3,
              "output_type": "latent"}
    from_latents = pipe(latents=noise, **kwargs).images
    from_generator = pipe(generator=torch.Generator().manual_seed(7), **kwargs).images
    torch.testing.assert_close(from_latents, from_generator)


def test_pipeline_output_types_and_validation(pipe: ReferencePipeline) -> None:
    (array,) = pipe("a green cross", num_inference_steps=2, output_type="np", return_dict=False)
    assert array.shape == (1, 32, 32, 3) and 0 <= array.min() and array.max() <= 1
    tensor = pipe("a green cross", num_inference_steps=2, output_type="pt", num_images_per_prompt=2).images
    assert tensor.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="33"):
        pipe("a green cross", height=33)


def test_pipeline_takes_sd3s_step_end_callback_and_custom_sigmas(pipe: ReferencePipeline) -> None:
    """The call matches SD3's: code that passes `callback_on_step_end` or `sigmas` to an SD3 pipeline (a TypeError here
    before) runs on the reference one with diffusers' meaning, plain and accelerated."""
    import catrt
    from diffusers.callbacks import SD3CFGCutoffCallback

    def run(runner: Any = pipe, **kwargs: Any) -> torch.Tensor:
        return runner("a small red circle in the top left on a blue background", output_type="latent",
                      generator=torch.Generator().manual_seed(3), **kwargs).images

    seen: list[tuple[int, float, tuple[str, ...], tuple[int, ...]]] = []

    def record(p: Any, i: int, t: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert p is pipe and p.num_timesteps == 4
        seen.append((i, float(t), tuple(tensors), tuple(tensors["prompt_embeds"].shape)))
        return {}

    plain = run(num_inference_steps=4)
    watched = run(num_inference_steps=4, callback_on_step_end=record,
                  callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    assert torch.equal(watched, plain)
    assert [(i, names, shape) for i, _, names, shape in seen] == [(i, ("latents", "prompt_embeds"), (2, 16, 64)) for i in range(4)]
    assert [t for _, t, _, _ in seen] == pytest.approx([float(t) for t in pipe.scheduler.timesteps])
    zeroed = run(num_inference_steps=4, callback_on_step_end=lambda p, i, t, kw: {"latents": kw["latents"] * 0} if i == 3 else {})
    assert not zeroed.any()  # the callback's tensor replaced the latents

    def stop(p: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        p._interrupt = i == 1
        return {}

    batches: list[int] = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    try:
        run(num_inference_steps=5, callback_on_step_end=stop)  # interrupted after its second step
        run(num_inference_steps=5, callback_on_step_end=SD3CFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=2))
    finally:
        handle.remove()
    assert batches == [2, 2] + [2, 2, 2, 1, 1]  # the cutoff keeps the conditional row after step 3, as SD3's loop does
    with pytest.raises(ValueError, match=r"callback_on_step_end_tensor_inputs must be among .*got \['noise'\]"):
        run(num_inference_steps=2, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["noise"])

    sigmas = [1.0, 0.7, 0.4]
    timesteps: list[float] = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: timesteps.append(float(kwargs["timestep"][0])), with_kwargs=True)
    try:
        custom = run(sigmas=sigmas, num_inference_steps=28)  # a custom schedule sets the step count, as in diffusers
        fast = catrt.accelerate(pipe, catrt.CATConfig(alpha=0.5, t0=2, trace=True))
        pruned = run(fast, sigmas=sigmas, callback_on_step_end=lambda p, i, t, kw: {"latents": kw["latents"]})
    finally:
        handle.remove()
    assert timesteps == pytest.approx([1000 * s for s in sigmas] * 2)
    assert [r.kind for r in fast.last_trace] == ["full", "full", "pruned"] and torch.isfinite(pruned).all()
    assert not torch.equal(custom, run(num_inference_steps=3))


def test_pipeline_takes_no_callback_tensor_inputs_as_sd3_does(pipe: ReferencePipeline) -> None:
    """SD3's call checks `callback_on_step_end_tensor_inputs` only when it is not None, so code that passes None without
    a callback (a wrapper forwarding its own default) runs there; here it was a TypeError ('NoneType' object is not
    iterable), plain and accelerated."""
    import catrt

    def run(runner: Any, **kwargs: Any) -> torch.Tensor:
        return runner("a small red circle", num_inference_steps=3, output_type="latent",
                      generator=torch.Generator().manual_seed(3), **kwargs).images

    assert torch.equal(run(pipe, callback_on_step_end_tensor_inputs=None), run(pipe))
    fast = catrt.accelerate(pipe, catrt.CATConfig(alpha=0.5, t0=2))
    assert torch.equal(run(fast, callback_on_step_end_tensor_inputs=None), run(fast))


def test_probe_reads_fresh_renders() -> None:
    samples = data.generate(48, seed=2024)
    accuracy = attribute_accuracy(np.stack([s.image for s in samples]), samples, load_probe())
    assert min(accuracy.values()) >= 0.95, accuracy
    predicted = classify([Image.fromarray(s.image) for s in samples[:4]])
    assert predicted["shape"] == [s.shape for s in samples[:4]]


def test_probe_reads_every_image_form_alike_and_refuses_what_it_cannot_read() -> None:
    samples = data.generate(4, seed=77)
    arrays = [s.image for s in samples]
    expected = classify(np.stack(arrays))
    assert expected["shape"] == [s.shape for s in samples]
    floats = np.stack(arrays).astype(np.float32) / 255  # diffusers' output_type="np"
    for images in (arrays, [Image.fromarray(a) for a in arrays], floats, data.to_tensor(arrays)):
        assert classify(images) == expected
    single = classify(arrays[0])  # one render, no batch axis
    assert single == {name: values[:1] for name, values in expected.items()}
    assert classify(Image.fromarray(arrays[1]))["position"] == [samples[1].position]
    for images, message in [
        (np.zeros((1, 64, 64, 3), np.uint8), "the probe reads 32x32 images, got 64x64"),
        ([Image.new("RGB", (48, 32))], "the probe reads 32x32 images, got 48x32"),
        (np.zeros((1, 32, 32, 3), np.int32), "the probe takes uint8 images or floats in [0, 1], got int32"),
        (np.zeros((1, 32, 32), np.uint8), "the probe takes (H, W, 3) RGB images"),
        (torch.zeros(1, 32, 32, 3), "the probe takes float (B, 3, H, W) tensors in [-1, 1]"),
        # one image is named by the shape it was passed with, not the batch of one it becomes
        (np.zeros((3, 32, 32), np.uint8), "the probe takes (H, W, 3) RGB images, got an array of shape (3, 32, 32)"),
        (torch.zeros(32, 32, 3), "the probe takes float (B, 3, H, W) tensors in [-1, 1], got torch.float32 of shape (32, 32, 3)"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)) as caught:
            classify(images)
        assert caught.value.field == "images"


def test_reference_samples_match_their_captions(pipe: ReferencePipeline) -> None:
    accuracy = reference_accuracy(pipe, n=16, seed=5)
    # Colour, position, background and size come out right; shape is the model's weak attribute
    # (about 0.7 over 64 samples), still far above the 0.2 of chance.
    assert min(accuracy[name] for name in ("colour", "position", "background")) >= 0.9, accuracy
    assert accuracy["size"] >= 0.8 and accuracy["shape"] >= 0.4, accuracy


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def isolated_training() -> Iterator[None]:
    """train.main sets torch's thread count and seeds torch's RNG: give both back to the other tests."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        yield
    torch.set_num_threads(threads)


TINY = ["--batch-size", "2", "--samples", "0", "--threads", str(torch.get_num_threads())]


def test_train_resumes_from_its_out_folder_and_leaves_shipped_weights_alone(
    tmp_path: Path, isolated_training: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    shipped = _digests(WEIGHTS_DIR)
    out = tmp_path / "run"
    first = train.main(["--out", str(out), "--max-steps", "1", *TINY])
    assert first.step == 1
    assert torch.load(out / train.CHECKPOINT_FILE, weights_only=False)["step"] == 1
    assert sorted(p.name for p in (out / "weights").iterdir()) == sorted(train.WEIGHT_FILES)

    steps_run = []
    original = train.Trainer.train_step
    monkeypatch.setattr(train.Trainer, "train_step", lambda self: steps_run.append(self.step) or original(self))
    with caplog.at_level(logging.INFO, logger=train.logger.name):
        second = train.main(["--out", str(out), "--max-steps", "2", *TINY])
    assert steps_run == [1]  # one more step, continuing from the checkpoint's step 1
    assert second.step == 2 and second.elapsed > first.elapsed
    assert torch.load(out / train.CHECKPOINT_FILE, weights_only=False)["step"] == 2
    assert f"resumed from {out / train.CHECKPOINT_FILE} at step 1" in caplog.text
    assert _digests(WEIGHTS_DIR) == shipped


def _clock(seconds_a_call: float) -> Any:
    """A perf_counter of a machine whose every timed span lasts `seconds_a_call` (a fast or a slow machine)."""
    now = [0.0]

    def perf_counter() -> float:
        now[0] += seconds_a_call
        return now[0]

    return perf_counter


def test_the_learning_rate_follows_the_step_count_not_the_clock(
    tmp_path: Path, isolated_training: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rate decayed over the training seconds: the same command gave other weights on a slower machine (and on one
    machine, from run to run). Two runs of 2 steps, one on a machine whose step takes a quarter of the budget, train
    the same weights."""
    cfg = train.TrainConfig(batch_size=2, max_steps=2, minutes=60.0)
    weights = []
    for seconds in (0.01, 900.0):
        monkeypatch.setattr(train.time, "perf_counter", _clock(seconds))
        trainer = train.train(cfg, tmp_path / f"run-{seconds}", progress=False)
        assert trainer.step == 2
        weights.append(_digests(tmp_path / f"run-{seconds}" / "weights"))
    assert weights[0] == weights[1]


def test_a_time_budget_is_a_step_schedule_measured_once_and_repeated_by_max_steps(
    tmp_path: Path, isolated_training: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without --max-steps the schedule is the steps the budget holds at a pace measured on a throwaway copy before
    the first step, logged and kept in the checkpoint: --max-steps with that count trains the same weights anywhere."""
    monkeypatch.setattr(train.time, "perf_counter", _clock(0.5))
    with caplog.at_level(logging.INFO, logger=train.logger.name):
        timed = train.train(train.TrainConfig(batch_size=2, minutes=1 / 60), tmp_path / "timed", progress=False)
    assert timed.step == 2 and timed.pace == 0.5  # 1 s at 0.5 s a step
    assert f"learning-rate schedule: 2 steps, what {1 / 60:g} min hold at 0.5 s a step measured here; --max-steps 2" in caplog.text
    state = torch.load(tmp_path / "timed" / train.CHECKPOINT_FILE, weights_only=False)
    assert state.pop("pace") == 0.5
    earlier = train.Trainer(train.TrainConfig(batch_size=2))  # a checkpoint of before the pace was kept: its own pace
    earlier.load_state_dict(state)
    assert earlier.pace == 0.5 and earlier.total_steps() == 7200  # the default 60 minutes at its pace
    monkeypatch.setattr(train.time, "perf_counter", _clock(0.01))
    train.train(train.TrainConfig(batch_size=2, max_steps=2), tmp_path / "stepped", progress=False)
    assert _digests(tmp_path / "timed" / "weights") == _digests(tmp_path / "stepped" / "weights")
    monkeypatch.setattr(train, "train", lambda cfg, out, resume: timed)  # the command's last line names the schedule
    train.main(["--out", str(tmp_path / "timed"), "--minutes", str(1 / 60), *TINY])
    assert "; a schedule of 2 steps (--max-steps 2 repeats it)" in capsys.readouterr().out


def test_the_schedule_ends_a_run_whatever_the_clock(
    tmp_path: Path, isolated_training: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clock still stopped a run: a timed run whose steps ran slower than its trial steps (0.75 s against 0.5 s)
    stopped at step 3 of its 4-step schedule, and `--max-steps 4` on a machine slower than the 60-minute budget at
    step 3 (1500 s a step), so neither trained the weights `--max-steps 4` trains on a fast machine, as logged."""
    monkeypatch.setattr(train, "measure_pace", lambda trainer, steps=3: 0.5)
    monkeypatch.setattr(train.time, "perf_counter", _clock(0.75))
    timed = train.train(train.TrainConfig(batch_size=2, minutes=2 / 60), tmp_path / "timed", progress=False)
    monkeypatch.setattr(train.time, "perf_counter", _clock(1500.0))
    slow = train.train(train.TrainConfig(batch_size=2, max_steps=4), tmp_path / "slow", progress=False)
    monkeypatch.setattr(train.time, "perf_counter", _clock(0.01))
    fast = train.train(train.TrainConfig(batch_size=2, max_steps=4), tmp_path / "fast", progress=False)
    assert timed.total_steps() == 4 and timed.step == slow.step == fast.step == 4
    assert _digests(tmp_path / "timed" / "weights") == _digests(tmp_path / "slow" / "weights") == _digests(
        tmp_path / "fast" / "weights")


def test_train_writes_package_weights_only_with_publish(
    tmp_path: Path, isolated_training: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = _digests(WEIGHTS_DIR)
    package = tmp_path / "package-weights"  # a stand-in for catrt/reference/weights
    shutil.copytree(WEIGHTS_DIR, package)
    monkeypatch.setattr(train, "WEIGHTS_DIR", package)
    with pytest.raises(SystemExit) as refused:
        train.main(["--out", str(package / "run"), *TINY])
    assert refused.value.code == 2 and not (package / "run").exists()
    train.main(["--out", str(tmp_path / "run"), "--max-steps", "1", *TINY])
    assert _digests(package) == shipped
    train.main(["--out", str(tmp_path / "run"), "--max-steps", "1", "--publish", *TINY])
    published = _digests(package)
    assert published == {**shipped, **_digests(tmp_path / "run" / "weights")}
    assert published["probe.safetensors"] == shipped["probe.safetensors"]
    assert published[train.TRANSFORMER_FILE] != shipped[train.TRANSFORMER_FILE]
    assert _digests(WEIGHTS_DIR) == shipped


def test_publish_into_a_read_only_package_folder_is_refused_before_training(
    tmp_path: Path, isolated_training: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An installed package's folder is read-only while its files may be writable: --publish failed with a traceback
    after all the training, since each file is replaced by a new one written beside it."""
    from tests.test_atomic_files import refuse_new_files

    package = tmp_path / "package-weights"
    shutil.copytree(WEIGHTS_DIR, package)
    monkeypatch.setattr(train, "WEIGHTS_DIR", package)
    monkeypatch.setattr(train, "train", lambda *args, **kwargs: pytest.fail("trained"))
    refuse_new_files(monkeypatch, package)
    with pytest.raises(SystemExit) as refused:
        train.main(["--out", str(tmp_path / "run"), "--publish", *TINY])
    (line,) = capsys.readouterr().err.splitlines()
    assert refused.value.code == 2 and line.startswith(
        f"python -m catrt.reference.train: error: --publish cannot replace the shipped weights in {package}: its folder "
        f"{package} is not writable (Permission denied), though the file is")
    assert f"make {package} writable or train without --publish (the weights stay in --out's weights/)" in line
    assert _digests(package) == _digests(WEIGHTS_DIR)


def test_another_users_files_in_a_sticky_folder_are_refused_before_training(
    tmp_path: Path, isolated_training: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--out /tmp/run`'s checkpoint, or the shipped weights, of another user in a sticky folder: anyone may make the
    temporary file beside them, and only the rename at the first checkpoint (or after all the training) failed. The
    tests run as root, so another user is simulated by os.geteuid; the folders are really sticky."""
    monkeypatch.setattr(train, "train", lambda *args, **kwargs: pytest.fail("trained"))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    run = tmp_path / "run"
    run.mkdir()
    os.chmod(run, 0o1777)
    (run / "checkpoint.pt").write_bytes(b"another user's checkpoint")
    with pytest.raises(SystemExit) as refused:
        train.main(["--out", str(run), *TINY])
    (line,) = capsys.readouterr().err.splitlines()
    assert refused.value.code == 2 and line == (
        f"python -m catrt.reference.train: error: --out {run}: its checkpoint.pt cannot be replaced: it belongs to another "
        f"user (uid {os.stat(run / 'checkpoint.pt').st_uid}) and its folder {run} is sticky (as /tmp is): only the "
        "file's owner may replace or remove it there; train into another --out (see python -m catrt.reference.train --help)")
    (run / "checkpoint.pt").unlink()
    (run / "weights").mkdir()
    os.chmod(run / "weights", 0o1777)
    (run / "weights" / train.CONFIG_FILE).write_text("{}")
    with pytest.raises(SystemExit):
        train.main(["--out", str(run), *TINY])
    assert f"--out {run}: its weights/{train.CONFIG_FILE} cannot be replaced: it belongs" in capsys.readouterr().err
    (run / "weights" / train.CONFIG_FILE).unlink()
    package = tmp_path / "package-weights"
    shutil.copytree(WEIGHTS_DIR, package)
    os.chmod(package, 0o1777)
    monkeypatch.setattr(train, "WEIGHTS_DIR", package)
    with pytest.raises(SystemExit) as refused:
        train.main(["--out", str(run), "--publish", *TINY])
    (line,) = capsys.readouterr().err.splitlines()
    assert refused.value.code == 2 and line == (
        f"python -m catrt.reference.train: error: --publish cannot replace the shipped weights in {package}: it belongs "
        f"to another user (uid {os.stat(package / train.TRANSFORMER_FILE).st_uid}) and its folder {package} is sticky (as "
        "/tmp is): only the file's owner may replace or remove it there; train without --publish (the weights stay in "
        "--out's weights/) (see python -m catrt.reference.train --help)")
    assert sorted(p.name for p in run.iterdir()) == ["weights"] and not any((run / "weights").iterdir())


def test_a_saved_reference_pipeline_loads_back_by_folder_and_draws_the_same_image(
    pipe: ReferencePipeline, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Its word tokenizer was not saved (diffusers saves only library tokenizers) and diffusers looks up the saved
    class name in diffusers alone, so the folder could not be loaded back."""
    from catrt.cli import main
    from catrt.loading import load_pipeline

    folder = tmp_path / "saved"
    pipe.save_pretrained(folder)
    loaded = load_pipeline(str(folder))
    assert type(loaded) is ReferencePipeline
    prompts = ["", "a small red circle in the top left on a blue background", "Zebra 42!"]
    assert torch.equal(token_ids(loaded.tokenizer, prompts), token_ids(pipe.tokenizer, prompts))
    loaded.set_progress_bar_config(disable=True)
    call = {"prompt": prompts[1], "num_inference_steps": 4, "output_type": "pt"}
    by_folder = loaded(**call, generator=torch.Generator().manual_seed(0)).images
    by_name = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    # bit for bit: the loaded weights are owned copies, not left where BLAS may round differently
    assert torch.equal(by_folder, by_name)
    for model, out in (("reference", tmp_path / "name.png"), (str(folder), tmp_path / "folder.png")):
        # README's command as written (28 steps, t0 8): weights left in the safetensors mapping changed a pixel there
        assert main(["generate", "--model", model, "--prompt", prompts[1], "--out", str(out)]) == 0
    assert "error" not in capfd.readouterr().err
    assert (tmp_path / "name.png").read_bytes() == (tmp_path / "folder.png").read_bytes()


@pytest.mark.parametrize(("argv", "message"), [
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--minutes", "0"], "--minutes must be a finite number > 0, got 0.0"),
    (["--minutes", "nan"], "--minutes must be a finite number > 0, got nan"),
    (["--minutes", "inf"], "--minutes must be a finite number > 0, got inf"),
    (["--minutes", "-1"], "--minutes must be a finite number > 0, got -1.0"),
    # overflowed the schedule's step count: a traceback after the trial steps
    (["--minutes", "1e308"], f"--minutes must be in (0, {60 * 24 * 366}] (at most 366 days), got 1e+308"),
    (["--lr", "-0.1"], "--lr must be a finite number > 0, got -0.1"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    # trained NaNs for the whole budget and saved them (and --publish shipped them)
    (["--lr", "1e308"], "--lr must be in (0, 1] (AdamW moves each weight by about lr a step; the default is 0.001), got 1e+308"),
    (["--lr", "1.5"], "--lr must be in (0, 1] (AdamW moves each weight by about lr a step; the default is 0.001), got 1.5"),
    (["--threads", "0"], "--threads must be an integer >= 1, got 0"),
    (["--seed", "-1"], "--seed must be an integer >= 0, got -1"),
    (["--samples", "-8"], "--samples must be a multiple of 8 (rows of 8) >= 0, not -8"),
    (["--out", "FILE"], "is a file; give a folder for checkpoint.pt"),
    (["--out", "FILE/run"], "cannot be a folder (Not a directory); give a folder you can write for checkpoint.pt"),
    (["--out", "LONG"], "cannot be a folder (File name too long); give a folder you can write for checkpoint.pt"),
])
def test_train_mistakes_are_one_line_before_training(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "FILE").write_text("")
    argv = [str(tmp_path / a.replace("LONG", "x" * 300)) if a.startswith(("FILE", "LONG")) else a for a in argv]
    with pytest.raises(SystemExit) as refused:
        train.main(["--out", str(tmp_path / "run"), *argv])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "Traceback" not in err
    # one line, not argparse's usage block above it
    assert len(err.splitlines()) == 1 and err.startswith("python -m catrt.reference.train: error: ") and message in err, err
    assert not (tmp_path / "run").exists()


class _FullDisk:
    """A file whose disk fills after its first write: later writes fail as the OS fails them (ENOSPC)."""

    def __init__(self, file: Any) -> None:
        self.file, self.writes = file, 0

    def write(self, data: Any) -> int:
        self.writes += 1
        if self.writes > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.file.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


@pytest.mark.parametrize("full", ["checkpoint.pt", "weights/transformer.safetensors"])
def test_a_full_disk_while_saving_is_one_line_naming_the_file_and_the_earlier_one_is_kept(
    full: str, tmp_path: Path, isolated_training: None, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A full disk at the save was torch's RuntimeError ("unexpected pos 704 vs 598", no errno) or safetensors'
    SafetensorError, a traceback. Simulated (no small filesystem to fill here): torch's own save onto a file whose
    second write fails with ENOSPC, or the weights' write failing with ENOSPC half-way into its temporary file."""
    out = tmp_path / "run"
    train.main(["--out", str(out), "--max-steps", "1", *TINY])
    before = {name: (out / name).read_bytes() for name in ("checkpoint.pt", "weights/transformer.safetensors")}
    capsys.readouterr()
    real_save, real_write_bytes = torch.save, train.atomic_files.write_bytes

    def full_disk_save(obj: object, file: Any) -> None:
        if isinstance(file, (str, os.PathLike)):  # torch.save of a path: its writes are torch's own
            with open(file, "wb") as opened:
                real_save(obj, _FullDisk(opened))
        else:
            real_save(obj, _FullDisk(file))

    def full_disk_write_bytes(path: Path, data: bytes) -> None:
        if path.name != "transformer.safetensors":
            return real_write_bytes(path, data)
        with train.atomic_files.replacing(path) as temporary:
            temporary.write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if full == "checkpoint.pt":
        monkeypatch.setattr(train.torch, "save", full_disk_save)
    else:
        monkeypatch.setattr(train.atomic_files, "write_bytes", full_disk_write_bytes)
    with pytest.raises(SystemExit) as failed:
        train.main(["--out", str(out), "--max-steps", "2", *TINY])
    err = capsys.readouterr().err
    assert failed.value.code == 1 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err == (f"python -m catrt.reference.train: error: could not write {out / full} (No space left on device); "
                   f"the earlier {Path(full).name}, if any, is left as it was: free some space or train into another "
                   "--out\n")
    # the earlier file (and, past a failed checkpoint, the earlier weights: the step-2 checkpoint came before them)
    kept = before if full == "checkpoint.pt" else {full: before[full]}
    assert {name: (out / name).read_bytes() for name in kept} == kept
    assert not [p.name for p in out.rglob("*.tmp")]  # and no temporary file


def _damage(folder: Path, name: str, how: str) -> None:
    path = folder / name
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # one byte of a weight changed: the file still loads, as another model
        data_ = bytearray(path.read_bytes())
        data_[-100] ^= 0x01
        path.write_bytes(bytes(data_))


@pytest.mark.parametrize("name", ["transformer.safetensors", "text_encoder.safetensors", "config.json"])
@pytest.mark.parametrize(("how", "says"), [("missing", "is missing"), ("truncated", "does not match its size and sha256"),
                                           ("edited", "does not match its size and sha256")])
def test_a_missing_damaged_or_edited_weight_file_is_refused_naming_it(tmp_path: Path, name: str, how: str, says: str) -> None:
    """A missing or truncated file failed in safetensors or json with a traceback; an edited byte loaded silently."""
    from catrt.errors import CorruptBundleError

    folder = tmp_path / "weights"
    shutil.copytree(WEIGHTS_DIR, folder)
    _damage(folder, name, how)
    with pytest.raises(CorruptBundleError, match=re.escape(f"the reference weight file {folder / name} {says}")) as refused:
        load_reference_pipeline(weights_dir=folder)
    assert refused.value.field == name


def test_weights_without_their_digest_record_are_refused(tmp_path: Path) -> None:
    from catrt.errors import CorruptBundleError

    folder = tmp_path / "weights"
    shutil.copytree(WEIGHTS_DIR, folder)
    (folder / "sha256.json").unlink()
    with pytest.raises(CorruptBundleError, match=re.escape(f"the reference weights in {folder} have no sha256.json")):
        load_reference_pipeline(weights_dir=folder)
    (folder / "sha256.json").write_text("[1, 2]")
    with pytest.raises(CorruptBundleError, match=re.escape(f"the reference weights folder {tmp_path / 'nowhere'} does not exist")):
        load_reference_pipeline(weights_dir=tmp_path / "nowhere")
    with pytest.raises(CorruptBundleError, match="is not a JSON object of file records"):
        load_reference_pipeline(weights_dir=folder)


@pytest.mark.parametrize("damaged", ["garbage", "[1, 2]"])
def test_training_writes_a_damaged_digest_record_anew(tmp_path: Path, damaged: str) -> None:
    """Training's save read the record it updates and refused a damaged one with a traceback after the run (retraining,
    the refusal's fix, failed the same way); the record is written anew, and a file only it named is refused at load."""
    from catrt.errors import CorruptBundleError
    from catrt.reference.checksums import verify_files, write_checksums

    for name in ("a.bin", "b.bin"):
        (tmp_path / name).write_bytes(name.encode())
    (tmp_path / "sha256.json").write_text(damaged)
    write_checksums(tmp_path, ["a.bin"])
    verify_files(tmp_path, ["a.bin"])
    with pytest.raises(CorruptBundleError, match=re.escape(f"{tmp_path / 'b.bin'} is not in sha256.json")):
        verify_files(tmp_path, ["b.bin"])


def test_a_weight_file_this_user_cannot_read_is_refused_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights another user trained are owner-only (safetensors writes 0600): hashing them raised PermissionError with a
    traceback. Root reads any file, so the OS's refusal is stood in for."""
    from catrt.errors import CorruptBundleError
    from catrt.reference import checksums

    folder = tmp_path / "weights"
    shutil.copytree(WEIGHTS_DIR, folder)

    def refused(path: Path) -> str:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(checksums, "file_digest", refused)
    with pytest.raises(CorruptBundleError, match=re.escape(f"the reference weight file {folder / 'config.json'} cannot be "
                                                           "read (Permission denied); make it readable")) as error:
        load_reference_pipeline(weights_dir=folder)
    assert error.value.field == "config.json"


def test_an_edited_probe_is_refused_naming_it(tmp_path: Path) -> None:
    from catrt.errors import CorruptBundleError

    folder = tmp_path / "weights"
    shutil.copytree(WEIGHTS_DIR, folder)
    _damage(folder, "probe.safetensors", "edited")
    with pytest.raises(CorruptBundleError, match=re.escape(f"{folder / 'probe.safetensors'} does not match")):
        load_probe(folder / "probe.safetensors")


def test_generate_with_damaged_shipped_weights_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import catrt.reference.pipeline as reference_pipeline
    from catrt.cli import main

    folder = tmp_path / "weights"
    shutil.copytree(WEIGHTS_DIR, folder)
    _damage(folder, "transformer.safetensors", "truncated")
    monkeypatch.setattr(reference_pipeline, "WEIGHTS_DIR", folder)
    code = main(["generate", "--prompt", "a red circle", "--steps", "10", "--t0", "4", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines() == [
        f"catrt generate: error: the reference weight file {folder / 'transformer.safetensors'} does not match its size "
        "and sha256 in sha256.json (damaged or edited); reinstall catrt or retrain the weights"]
    assert not (tmp_path / "x.png").exists()


def test_the_shipped_weights_match_their_record() -> None:
    from catrt.reference.checksums import PROBE_CHECKSUM_FILE, verify_files

    verify_files(WEIGHTS_DIR, [train.TRANSFORMER_FILE, train.TEXT_ENCODER_FILE, train.CONFIG_FILE])
    verify_files(WEIGHTS_DIR, ["probe.safetensors"], PROBE_CHECKSUM_FILE)


def test_publish_refuses_weights_damaged_since_training(tmp_path: Path, isolated_training: None,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from catrt.errors import CorruptBundleError

    package = tmp_path / "package-weights"
    shutil.copytree(WEIGHTS_DIR, package)
    shipped = _digests(package)
    train.main(["--out", str(tmp_path / "run"), "--max-steps", "1", *TINY])
    assert sorted(p.name for p in (tmp_path / "run" / "weights").iterdir()) == sorted(train.WEIGHT_FILES)
    load_reference_pipeline(weights_dir=tmp_path / "run" / "weights")  # what training writes loads
    _damage(tmp_path / "run" / "weights", train.TRANSFORMER_FILE, "edited")
    with pytest.raises(CorruptBundleError, match="does not match its size and sha256"):
        train.publish(tmp_path / "run" / "weights", package)
    assert _digests(package) == shipped


@pytest.mark.parametrize(("argv", "message"), [
    (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["--threads", "0"], "--threads must be an integer >= 1, got 0"),
    (["--reference-samples", "-1"], "--reference-samples must be an integer >= 0, got -1"),
    (["--reference-samples", "1025"], "--reference-samples must be at most 1024 (drawn in one pipeline call after the training), got 1025"),
    (["--out", "{tmp}"], "--out {tmp} is a folder; give the probe's file, e.g. {tmp}/probe.safetensors"),
    (["--out", "{tmp}/a-file/probe.safetensors"], "--out {tmp}/a-file/probe.safetensors: its folder is a file"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_probe_training_mistakes_are_one_line_before_training(
    argv: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--steps 0 failed in OneCycleLR and --threads 0 in torch with tracebacks; a bad --out failed the save after
    minutes of training; --reference-samples past training's bound rendered and held them all, after the training,
    before its one pipeline call."""
    from catrt.reference import probe

    (tmp_path / "a-file").write_text("x")
    monkeypatch.setattr(probe, "train_probe", lambda **kwargs: pytest.fail("trained"))
    with pytest.raises(SystemExit) as refused:
        probe.main([word.format(tmp=tmp_path) for word in argv])
    (line,) = capsys.readouterr().err.splitlines()
    assert refused.value.code == 2 and line.startswith(f"python -m catrt.reference.probe: error: {message.format(tmp=tmp_path)}")


def test_probe_evaluate_reports_a_probes_accuracy_without_training_or_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The accuracies the issue asks the probe to report could only be had by retraining it, over the shipped weights
    by default."""
    from catrt.reference import probe

    folder = tmp_path / "weights"
    shutil.copytree(WEIGHTS_DIR, folder)
    before = _digests(folder)
    monkeypatch.setattr(probe, "train_probe", lambda **kwargs: pytest.fail("trained"))
    probe.main(["--evaluate", "--reference-samples", "0", "--out", str(folder / "probe.safetensors")])
    (line,) = capsys.readouterr().out.splitlines()
    assert line == "held-out renders: " + str(dict.fromkeys(probe.CLASSES, 1.0))  # the shipped probe reads renders exactly
    assert _digests(folder) == before
    damaged = tmp_path / "damaged"  # another path: load_probe caches the one it loaded
    shutil.copytree(WEIGHTS_DIR, damaged)
    _damage(damaged, "probe.safetensors", "edited")
    with pytest.raises(SystemExit) as refused:
        probe.main(["--evaluate", "--out", str(damaged / "probe.safetensors")])
    assert refused.value.code == 2 and capsys.readouterr().err.splitlines() == [
        f"python -m catrt.reference.probe: error: the reference weight file {damaged / 'probe.safetensors'} does not match "
        "its size and sha256 in probe.sha256.json (damaged or edited); reinstall catrt or retrain the weights"]



@pytest.mark.parametrize(("out", "message"), [
    ("{tmp}", "--out {tmp} is a folder; give the probe's file, e.g. {tmp}/probe.safetensors"),
    ("{tmp}/none.safetensors", "--out {tmp}/none.safetensors does not exist; give the probe's file to evaluate (default: "
                               "the shipped one), or train one there first (python -m catrt.reference.probe --out "
                               "{tmp}/none.safetensors)"),
    ("{tmp}/probe.safetensors", "the reference weights in {tmp} have no probe.sha256.json (the digests training records "
                                "beside them); reinstall catrt, or retrain (python -m catrt.reference.probe) to write weights"),
], ids=["folder", "missing", "no-record"])
def test_probe_evaluate_mistakes_name_the_probe_file_in_one_line(
    out: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--evaluate --out weights/` (the probe's folder) was refused for a probe.sha256.json missing in the folder above
    it, and a missing file for its folder's record, each with training's command (catrt.reference.train) to fix it."""
    from catrt.reference import probe

    shutil.copy(WEIGHTS_DIR / "probe.safetensors", tmp_path / "probe.safetensors")  # without its digest record
    before = _digests(tmp_path)
    monkeypatch.setattr(probe, "train_probe", lambda **kwargs: pytest.fail("trained"))
    with pytest.raises(SystemExit) as refused:
        probe.main(["--evaluate", "--reference-samples", "0", "--out", out.format(tmp=tmp_path)])
    (line,) = capsys.readouterr().err.splitlines()
    assert refused.value.code == 2 and line.startswith(f"python -m catrt.reference.probe: error: {message.format(tmp=tmp_path)}")
    assert _digests(tmp_path) == before


def test_probe_takes_reference_samples_up_to_trainings_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bound is training's --samples bound (`train.MAX_SAMPLES`), itself accepted: training starts."""
    from catrt.reference import probe

    class Trained(Exception):
        pass

    def trained(**kwargs: Any) -> None:
        raise Trained

    monkeypatch.setattr(probe, "train_probe", trained)
    with pytest.raises(Trained):
        probe.main(["--reference-samples", str(train.MAX_SAMPLES), "--threads", str(torch.get_num_threads()),
                    "--out", str(tmp_path / "probe.safetensors")])

def test_a_probe_the_disk_refuses_is_one_line_naming_the_file_and_the_earlier_one_is_kept(
    tmp_path: Path, isolated_training: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """safetensors' save_file, failing on a full disk, raised a SafetensorError traceback (its Rust writer's error, no
    OSError) after the training. The disk is made to refuse by a file-size limit (RLIMIT_FSIZE, its signal ignored):
    any write past it fails with EFBIG, Rust's as Python's, as a full disk fails them with ENOSPC."""
    import resource
    import signal

    from catrt.reference import probe

    out = tmp_path / "probe.safetensors"
    out.write_bytes(b"an earlier probe")
    monkeypatch.setattr(probe, "attribute_accuracy", lambda *args: pytest.fail("went on after the failed save"))
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limits[1]))
    try:
        with pytest.raises(SystemExit) as failed:
            probe.main(["--steps", "1", "--threads", str(torch.get_num_threads()), "--reference-samples", "0",
                        "--out", str(out)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    err = capsys.readouterr().err
    assert failed.value.code == 1 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err == (f"python -m catrt.reference.probe: error: could not write {out} ({os.strerror(errno.EFBIG)}); the "
                   "earlier probe.safetensors, if any, is left as it was: free some space or save the probe elsewhere "
                   "(--out)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe.safetensors"] and out.read_bytes() == b"an earlier probe"


def test_another_users_probe_in_a_sticky_folder_is_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Anyone may make the temporary file beside it in a sticky folder (/tmp): only the rename after minutes of
    training failed. Another user is simulated by os.geteuid (the tests run as root)."""
    from catrt.reference import probe

    os.chmod(tmp_path, 0o1777)
    out = tmp_path / "probe.safetensors"
    out.write_bytes(b"another user's probe")
    monkeypatch.setattr(probe, "train_probe", lambda **kwargs: pytest.fail("trained"))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SystemExit) as refused:
        probe.main(["--out", str(out)])
    (line,) = capsys.readouterr().err.splitlines()
    assert refused.value.code == 2 and line.startswith(
        f"python -m catrt.reference.probe: error: --out {out}: {out} cannot be replaced: it belongs to another user (uid "
        f"{os.stat(out).st_uid}) and its folder {tmp_path} is sticky (as /tmp is): only the file's owner may replace or "
        "remove it there; save the probe elsewhere (--out)")


def test_a_trained_probe_is_saved_whole_with_its_digest(tmp_path: Path, isolated_training: None) -> None:
    from catrt.reference import probe

    out = tmp_path / "probe.safetensors"
    probe.train_probe(steps=1, batch_size=2, out=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe.safetensors", "probe.sha256.json"]
    probe.load_probe.cache_clear()
    try:
        assert isinstance(probe.load_probe(out), probe.Probe)
    finally:
        probe.load_probe.cache_clear()


def test_a_folder_where_training_or_the_probe_writes_a_file_is_refused_before_training(
    tmp_path: Path, isolated_training: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder named checkpoint.pt failed in torch.load at once (a traceback), one at a weights or samples file or
    at the probe's digest record failed its save after all the training, and a file named weights failed
    save_weights' mkdir with a traceback: each is refused before any training, naming it."""
    from catrt.reference import probe

    monkeypatch.setattr(train, "train", lambda *args, **kwargs: pytest.fail("trained"))
    monkeypatch.setattr(probe, "train_probe", lambda **kwargs: pytest.fail("trained"))
    run = tmp_path / "run"
    for name, says in (
        ("checkpoint.pt", "its checkpoint.pt cannot be replaced: it is a folder"),
        (f"weights/{train.CONFIG_FILE}", f"its weights/{train.CONFIG_FILE} cannot be replaced: it is a folder"),
        ("samples.png", "its samples.png cannot be replaced: it is a folder"),
        ("weights", "its weights is not a folder, where the run writes the trained weights"),
        ("weights link", "its weights is not a folder, where the run writes the trained weights"),  # dangling
    ):
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir()
        if name == "weights":
            (run / name).write_text("a file")
        elif name == "weights link":
            (run / "weights").symlink_to(tmp_path / "gone")
        else:
            (run / name).parent.mkdir(exist_ok=True)
            (run / name).mkdir()
        with pytest.raises(SystemExit) as refused:
            train.main(["--out", str(run), *TINY, "--samples", "8"])
        (line,) = capsys.readouterr().err.splitlines()
        assert refused.value.code == 2 and line.startswith(f"python -m catrt.reference.train: error: --out {run}: {says}"), line
    (tmp_path / probe.PROBE_CHECKSUM_FILE).mkdir()
    out = tmp_path / "probe.safetensors"
    with pytest.raises(SystemExit) as refused:
        probe.main(["--out", str(out)])
    (line,) = capsys.readouterr().err.splitlines()
    assert refused.value.code == 2 and line.startswith(
        f"python -m catrt.reference.probe: error: --out {out}: {tmp_path / probe.PROBE_CHECKSUM_FILE} cannot be replaced: "
        "it is a folder, where a file is written (renamed onto its name); move the folder away or save the probe "
        "elsewhere (--out)"), line


def test_a_save_refused_for_another_reason_than_space_does_not_say_free_some_space(
    tmp_path: Path, isolated_training: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another user's probe put in a sticky --out folder after the up-front check fails the final rename (EPERM):
    "free some space" was the fix the line gave for any refused write. The rename's refusal is made by a stand-in."""
    from catrt.reference import probe

    out = tmp_path / "probe.safetensors"
    out.write_bytes(b"an earlier probe")
    replace = os.replace

    def refused(source: Any, target: Any) -> None:
        if Path(target) == out:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))
        replace(source, target)

    monkeypatch.setattr(os, "replace", refused)
    monkeypatch.setattr(probe, "attribute_accuracy", lambda *args: pytest.fail("went on after the failed save"))
    with pytest.raises(SystemExit) as failed:
        probe.main(["--steps", "1", "--threads", str(torch.get_num_threads()), "--reference-samples", "0", "--out", str(out)])
    err = capsys.readouterr().err
    assert failed.value.code == 1 and err == (
        f"python -m catrt.reference.probe: error: could not write {out} ({os.strerror(errno.EPERM)}); the earlier "
        "probe.safetensors, if any, is left as it was: save the probe elsewhere (--out)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe.safetensors"] and out.read_bytes() == b"an earlier probe"


def test_more_samples_than_one_grid_holds_are_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--samples had no upper bound: the samples are drawn after all the training, each rendered and held first, in one
    pipeline call, so a mistyped count (80000000) ran out of memory or time at the end of the run."""
    monkeypatch.setattr(train, "train", lambda *args, **kwargs: pytest.fail("trained"))
    with pytest.raises(SystemExit) as refused:
        train.main(["--out", str(tmp_path / "run"), "--samples", "1032"])
    (line,) = capsys.readouterr().err.splitlines()
    assert refused.value.code == 2 and line.startswith(
        "python -m catrt.reference.train: error: --samples must be at most 1024 (drawn in one pipeline call after the "
        "training), got 1032")
    assert not (tmp_path / "run").exists()
