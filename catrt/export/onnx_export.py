"""Export the step modules to ONNX: the dynamo exporter, the TorchScript exporter as a fallback."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn
from tqdm.auto import tqdm

from catrt.errors import BuildError
from catrt.export.graphs import step_module
from catrt.export.quiet import errors_only
from catrt.export.weights import SharedWeights
from catrt.models.base import Adapter

logger = logging.getLogger(__name__)

OPSET = 18


def export_onnx(module: nn.Module, inputs: dict[str, torch.Tensor], output_names: tuple[str, ...]) -> tuple[onnx.ModelProto, str]:
    """(model with weights inline, exporter used). Falls back to TorchScript only if dynamo fails."""
    args = tuple(inputs.values())
    try:
        # torch.onnx warns of each torchvision op it cannot register when torchvision is absent (4 lines per
        # graph); catrt's graphs use none of them.
        with warnings.catch_warnings(), torch.no_grad(), errors_only("torch.onnx._internal.exporter._registration"):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, args, dynamo=True, input_names=list(inputs), output_names=list(output_names),
                opset_version=OPSET, verbose=False,
            )
        return program.model_proto, "dynamo"
    except Exception as error:  # noqa: BLE001 - any exporter failure means: try the other exporter
        logger.warning("dynamo ONNX export failed (%s: %s); falling back to the TorchScript exporter", type(error).__name__, error)
    return _export_torchscript(module, args, list(inputs), output_names), "torchscript"


def _export_torchscript(
    module: nn.Module, args: tuple[torch.Tensor, ...], input_names: list[str], output_names: tuple[str, ...]
) -> onnx.ModelProto:
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, args, buffer, dynamo=False, input_names=input_names,
                output_names=list(output_names), opset_version=OPSET,
            )
    except Exception as error:  # noqa: BLE001 - both exporters failed: report as a build error
        raise BuildError(f"ONNX export of {type(module).__name__} failed with both exporters: {error}", field="export") from error
    return onnx.load_from_string(buffer.getvalue())


def export_graphs(
    adapter: Adapter,
    inputs: dict[str, dict[str, torch.Tensor]],
    outputs: dict[str, dict[str, torch.Tensor]],
    folder: Path,
    progress: bool = True,
) -> dict[str, str]:
    """Export each graph of `inputs` (graph -> example inputs) into `folder` with shared weights.

    `outputs` names each graph's outputs (graph -> eager outputs). Returns the exporter used per graph.
    """
    latent_shape = tuple(inputs["full"]["hidden_states"].shape)
    models: dict[str, onnx.ModelProto] = {}
    exporters: dict[str, str] = {}
    with SharedWeights(folder) as weights:
        for graph in tqdm(inputs, desc="export onnx", disable=not progress, leave=False):
            module = step_module(graph, adapter, inputs[graph], outputs[graph], latent_shape)
            models[graph], exporters[graph] = export_onnx(module, inputs[graph], tuple(outputs[graph]))
            weights.move_out(graph, models[graph])  # one graph's weights in memory at a time
        weights.save(models)
    return exporters
