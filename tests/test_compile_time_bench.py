"""bench/compile_time.py on its quick setting (dynamo tracing only): the graph counts README's table states."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_quality_bench import committed_results, load_script


def rows_of(table: str) -> dict[str, list[str]]:
    """The table's rows by mode, each as its cells."""
    lines = [line for line in table.splitlines() if line.startswith("| tiny-sd3 |")]
    return {cells[1]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def test_regional_compiles_one_graph_per_block_kind_in_a_fresh_process(
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    """main() measures each mode in its own process and prints one table row per mode (and writes it to --out)."""
    before = committed_results()
    flags = ["--models", "tiny-sd3", "--modes", "regional", "--backend", "eager", "--repeats", "1"]
    load_script("compile_time").main([*flags, "--out", str(tmp_path / "compile.md")])
    assert committed_results() == before  # it writes --out only
    printed = capsys.readouterr().out
    written = (tmp_path / "compile.md").read_text()
    assert f"`python bench/compile_time.py {' '.join(flags)} --out {tmp_path / 'compile.md'}`" in written
    assert written.endswith(printed)  # the printed table, after the command and machine
    rows = rows_of(printed)
    assert list(rows) == ["regional"]
    model, mode, blocks, n_k, graphs, compile_s, full_ms, pruned_ms, recompiled = rows["regional"]
    # tiny-sd3: 2 blocks of 2 kinds (a joint block, the context_pre_only last one) x {full, pruned}; N = 24, k = 8
    assert (blocks, n_k, graphs, recompiled) == ("2", "24 / 8", "4", "no")
    assert float(compile_s.split("= ")[1]) > 0
    assert all(float(ms) > 0 for ms in (*full_ms.split(" / "), *pruned_ms.split(" / ")))


def test_whole_forward_compiles_one_graph_per_step_function() -> None:
    """measure() in this process (dynamo reset first): whole mode traces each forward as one graph."""
    bench = load_script("compile_time")
    torch._dynamo.reset()
    try:
        row = bench.measure("tiny-sd3", "whole", "eager", 1, 4)
    finally:
        torch._dynamo.reset()
    assert (row["graphs"], row["blocks"], row["N"], row["k"], row["recompiled_when_warm"]) == (2, 2, 24, 8, False)
    assert rows_of(bench.table([row]))["whole"][4] == "2"
