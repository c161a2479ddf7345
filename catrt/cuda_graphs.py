"""One step program captured as a CUDA graph and replayed: the runtime's `cuda_graphs` path.

With `cuda_graphs` each step program (catrt/runtime.py) runs once eagerly (warm-up: compilation,
cuBLAS plans), is then captured as one CUDA graph and replayed for every later step of every
generation of the same shape. The graphs of one step state (catrt/step_state.py) share one memory
pool: each program writes its results into the state's buffers, made outside any capture, so a graph
leaves nothing behind in the pool that another could overwrite, and one stream never replays two at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class CapturedStep:
    """A step program: first call eager on a side stream (warm-up), second call captured, then replayed.

    Every call does the step's work exactly once (the capture call replays right after capturing).
    Warm-up and capture run with the state's device current: streams and captures are per device, so
    from another current device (latents on cuda:1) the kernels would go to a stream nothing captures.
    Once captured, the program (a bound method of the runtime that made it, which holds the state) is
    let go: the graph alone replays the step, and no reference cycle keeps the state's caches alive.
    """

    def __init__(self, program: Callable[[], None], device: torch.device, pool: Any) -> None:
        self.program: Callable[[], None] | None = program
        self.device = device
        self.pool = pool
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warmed = False

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        program = self.program
        assert program is not None  # let go only once the graph exists
        with torch.cuda.device(self.device):
            if not self.warmed:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    program()
                torch.cuda.current_stream().wait_stream(side)
                self.warmed = True
                return
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                program()
            self.graph, self.program = graph, None
            graph.replay()
