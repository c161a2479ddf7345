"""The offline half of a build: example inputs, ONNX export with shared weights, engine compilers.

Nothing at runtime imports this package; the runtime reads only what it writes to disk.
"""

from catrt.export.backends import BACKEND_BUILDS, BackendBuild
from catrt.export.graphs import graph_spec, step_module
from catrt.export.onnx_export import export_graphs
from catrt.export.sample import StepSample, capture_step_sample, reference_io

__all__ = [
    "BACKEND_BUILDS",
    "BackendBuild",
    "StepSample",
    "capture_step_sample",
    "export_graphs",
    "graph_spec",
    "reference_io",
    "step_module",
]
