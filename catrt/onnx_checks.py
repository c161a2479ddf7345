"""ONNX bundles: each graph file computes the graph its manifest lists, with the bundle's own weights.

Part of `catrt.integrity.check_integrity`, run on an onnxruntime bundle once every other check holds. onnx and
numpy are imported where the checks run, so importing this module (and `catrt.integrity`) does not load them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from catrt.checks import integer
from catrt.errors import CatrtError, CorruptBundleError, echo


def onnx_graph_problems(folder: Path, graphs: Mapping[str, Any]) -> list[CatrtError]:
    """Each `<graph>.onnx` declares what the manifest says that graph takes and gives, and reads its weights
    from the bundle's `weights.bin` only.

    The digests tie the files to the manifest, not the manifest to the files: an unsigned bundle whose graph
    files were swapped (or replaced) and whose digests were rewritten passes every other check, and would fail
    inside ONNX Runtime at the first step. Read without the weights (the graph structure only).
    """
    import onnx
    from onnx import helper

    problems: list[CatrtError] = []
    table = _initializer_table(folder, graphs, problems)
    table_read = not problems
    for graph, spec in graphs.items():
        name = f"{graph}.onnx"
        try:
            model = onnx.load(str(folder / name), load_external_data=False)
        except Exception as error:  # noqa: BLE001 - whatever the parser raises, the file is not a graph
            problems.append(CorruptBundleError(f"{name} cannot be read as an ONNX graph ({type(error).__name__}): rebuild the engine", field=name))
            continue

        def declared(values: Iterable[Any]) -> dict[str, tuple[list[Any], str]]:
            found = {}
            for value in values:
                tensor = value.type.tensor_type
                dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim]
                found[value.name] = (dims, helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type else "?")
            return found

        expected = {kind: {t["name"]: (list(t["shape"]), t["dtype"]) for t in spec[kind]} for kind in ("inputs", "outputs")}
        inputs, outputs = declared(model.graph.input), declared(model.graph.output)
        # An exporter drops inputs a graph does not read, so the file's inputs are a subset; its outputs are all of them.
        wrong = [n for n, io in inputs.items() if expected["inputs"].get(n) != io]
        wrong += [n for n, io in expected["outputs"].items() if outputs.get(n) != io]
        if wrong:
            problems.append(CorruptBundleError(
                f"{name} does not compute the {graph} graph the manifest lists: its {echo(wrong[0])} is "
                f"{inputs.get(wrong[0]) or outputs.get(wrong[0]) or 'missing'}, the manifest says "
                f"{expected['inputs'].get(wrong[0]) or expected['outputs'].get(wrong[0]) or 'no such tensor'}; "
                f"the file was swapped or replaced: rebuild the engine",
                field=name, value=wrong[0],
            ))
            continue
        elsewhere = sorted({
            entry.value for initializer in model.graph.initializer for entry in initializer.external_data
            if entry.key == "location" and entry.value != "weights.bin"
        })
        if elsewhere:
            problems.append(CorruptBundleError(
                f"{name} reads weights from {echo(elsewhere[0])}, not the bundle's weights.bin: rebuild the engine",
                field=name, value=elsewhere[0],
            ))
        own = {initializer.name for initializer in model.graph.initializer}
        foreign = [record["name"] for record in table.get(graph, []) if record["name"] not in own]
        if foreign:
            problems.append(CorruptBundleError(
                f"initializers.json gives the {graph} graph an initializer {echo(foreign[0])} that {name} does not have: "
                f"rebuild the engine", field="initializers.json", value=foreign[0],
            ))
        elif table_read:
            problems += _table_against_graph(graph, name, model, table.get(graph, []))
    return problems


def _table_against_graph(graph: str, name: str, model: Any, records: list[dict[str, Any]]) -> list[CatrtError]:
    """The `initializers.json` records of a graph are its external initializers, each where (offset, length), as what
    (shape, element type) the graph itself says: the sessions take the weights from the table, so a table edited to
    another shape or another tensor's offset would run wrong weights, or fail inside ONNX Runtime."""
    import onnx

    graph_side = {
        initializer.name: (list(initializer.dims), onnx.TensorProto.DataType.Name(initializer.data_type).lower(),
                           {entry.key: entry.value for entry in initializer.external_data})
        for initializer in model.graph.initializer if initializer.data_location == onnx.TensorProto.EXTERNAL
    }
    for record in records:
        dims, dtype, where = graph_side.get(record["name"], (None, None, {}))
        table_side = (record["shape"], record["dtype"], str(record["offset"]), str(record["length"]))
        if (dims, dtype, where.get("offset", "0"), where.get("length")) != table_side:
            return [CorruptBundleError(
                f"initializers.json places the {graph} graph's {echo(record['name'])} as {record['shape']} {record['dtype']} "
                f"at offset {record['offset']} of weights.bin, but {name} has it as {dims} {dtype} at offset "
                f"{where.get('offset', '0') if dims is not None else 'none (not external)'}: rebuild the engine",
                field="initializers.json", value=record["name"],
            )]
    unlisted = sorted(set(graph_side) - {record["name"] for record in records})
    if unlisted:
        return [CorruptBundleError(
            f"initializers.json does not list the {graph} graph's weight {echo(unlisted[0])} ({name} reads it from "
            f"weights.bin): rebuild the engine", field="initializers.json", value=unlisted[0],
        )]
    return []


def _initializer_table(folder: Path, graphs: Mapping[str, Any], problems: list[CatrtError]) -> dict[str, list[dict[str, Any]]]:
    """`initializers.json`, checked as the index into `weights.bin` it must be (per graph: name, dtype, shape,
    offset and a length that is the shape's bytes, inside the file); a problem is appended and {} returned."""
    from catrt.engines.shared_weights import INITIALIZERS_FILE, NUMPY_DTYPES, WEIGHTS_FILE

    import numpy as np

    def refuse(message: str) -> dict[str, list[dict[str, Any]]]:
        problems.append(CorruptBundleError(f"{INITIALIZERS_FILE} {message}: rebuild the engine", field=INITIALIZERS_FILE))
        return {}

    try:
        table = json.loads((folder / INITIALIZERS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return refuse(f"cannot be read as JSON ({type(error).__name__})")
    if not isinstance(table, dict) or not all(graph in graphs and isinstance(records, list) for graph, records in table.items()):
        return refuse("must map graph names of the manifest to lists of initializers")
    size = (folder / WEIGHTS_FILE).stat().st_size
    for graph, records in table.items():
        for index, record in enumerate(records):
            where = f"entry {index} of graph {echo(graph)}"
            keys = ("name", "offset", "length", "shape", "dtype")
            if not isinstance(record, dict) or not all(key in record for key in keys):
                return refuse(f"{where} needs {', '.join(keys)}")
            offset, length, shape = record["offset"], record["length"], record["shape"]
            if not (isinstance(record["name"], str) and record["dtype"] in NUMPY_DTYPES and _is_count(offset)
                    and _is_count(length) and isinstance(shape, list) and all(_is_count(d) for d in shape)):
                return refuse(f"{where} has a field of the wrong kind")
            if length != math.prod(shape) * np.dtype(NUMPY_DTYPES[record["dtype"]]).itemsize or offset + length > size:
                return refuse(f"{where} ({echo(record['name'])}) does not fit {WEIGHTS_FILE}: {length} bytes at offset {offset} "
                              f"for shape {shape}, in a file of {size} bytes")
    return table


def _is_count(value: object) -> bool:
    return integer(value) and value >= 0
