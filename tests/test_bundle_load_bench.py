"""bench/bundle_load.py on its --tiny setting: `catrt.load` timed by phase, the table written to --out."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_quality_bench import committed_results, load_script


def test_tiny_bundle_load_is_timed_by_phase_and_written_to_out(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """One load of a tiny-sd3 onnxruntime bundle: a row per phase, each a time, the whole load the largest."""
    before = committed_results()
    bench = load_script("bundle_load")
    flags = ["--tiny", "--repeats", "1", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "load.md")]
    bench.main(flags)
    assert committed_results() == before  # it writes --out and --work only
    printed = capsys.readouterr().out
    written = (tmp_path / "load.md").read_text()
    assert written.startswith(f"`python bench/bundle_load.py {' '.join(flags)}`") and written.endswith(printed)
    rows = {cells[0]: [float(c) for c in cells[1:]] for cells in (
        [c.strip() for c in line.strip("|").split("|")] for line in printed.splitlines() if line.startswith("| ")
    ) if cells[0] in bench.PHASES}
    assert list(rows) == list(bench.PHASES)
    assert all(first == median == low == high >= 0 for first, median, low, high in rows.values())  # one run: all agree
    assert rows["total"][0] == max(row[0] for row in rows.values())
    assert "tiny-sd3-32x32-b1-s6-t3-a0.30-l8-fp32-onnxruntime" in printed


def test_a_width_that_is_not_a_multiple_of_64_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        load_script("bundle_load").main(["--width", "100"])
    assert exited.value.code == 2
    assert "--width must be a positive multiple of 64, got 100" in capsys.readouterr().err


def test_a_widened_model_saved_only_in_part_is_not_taken_for_saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """save_pretrained writes model_index.json first: a run stopped mid-save (Ctrl-C, here after that first file) left
    a folder the next run reused as the saved model, and built its bundle from half its weights. The next run saves
    it again, whole."""
    from diffusers import DiffusionPipeline

    bench = load_script("bundle_load")
    save = DiffusionPipeline.save_pretrained

    def stopped_after_the_index(self: DiffusionPipeline, folder: str, *args: object, **kwargs: object) -> None:
        self.save_config(folder)  # model_index.json
        raise KeyboardInterrupt

    monkeypatch.setattr(DiffusionPipeline, "save_pretrained", stopped_after_the_index)
    folder = tmp_path / "model-1x64"
    with pytest.raises(KeyboardInterrupt):
        bench.widened_model(folder, 1, 64)
    assert not folder.exists()
    monkeypatch.setattr(DiffusionPipeline, "save_pretrained", save)
    assert bench.widened_model(folder, 1, 64) == folder
    assert (folder / "transformer" / "config.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == [folder.name]
