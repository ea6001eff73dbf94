"""CUDA graphs for the engine's fixed-shape calls (a UNet step over a batch, a preview decode), one per shape.

On a GPU a 4-step image is launch-bound in eager mode: a UNet call is hundreds of small kernels, each launched
from Python. A captured graph replays them all with one launch. The batch is padded up to a power of two, so a
handful of graphs covers every batch size. A shape seen for the first time runs eagerly and is queued; the live
loop's worker captures one queued shape between two steps (`capture_pending`, through `Engine.warm`), on the same
thread as every other GPU call, so a capture never overlaps a step and a request waits at most one capture.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch


def bucket(rows: int) -> int:
    """The batch a graph is captured for: the next power of two (1, 2, 4, 8, ...)."""
    return 1 << max(0, rows - 1).bit_length()


@dataclass
class Captured:
    graph: object  # torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]  # static buffers the graph reads, leading dimension = the bucket
    outputs: tuple[torch.Tensor, ...]  # static buffers it writes


class GraphCache:
    """Calls `fn(*tensors) -> tuple of tensors` through captured graphs where it can, eagerly where it cannot.

    Every input's first dimension is the batch. Outputs of a replay are the graph's own buffers: use them before
    the next call of this cache. `enabled=False` (CPU, MPS, a compiled UNet) always calls `fn` directly.
    """

    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]], enabled: bool, capacity: int = 12):
        self.fn, self.enabled, self.capacity = fn, enabled, capacity
        self._graphs: OrderedDict[tuple, Captured] = OrderedDict()
        self._wanted: OrderedDict[tuple, list[torch.Tensor]] = OrderedDict()  # key -> example inputs, padded
        self._pool = None  # one memory pool for all graphs: they never run at the same time
        self.replays = self.eager_calls = self.captures = 0

    def key(self, inputs: tuple[torch.Tensor, ...]) -> tuple:
        rows = bucket(inputs[0].shape[0])
        return tuple((rows, *t.shape[1:], t.dtype, str(t.device)) for t in inputs)

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.enabled:
            return self.fn(*inputs)
        rows, key = inputs[0].shape[0], self.key(inputs)
        captured = self._graphs.get(key)
        if captured is None:
            if key not in self._wanted:
                self._wanted[key] = [_padded(t, bucket(rows)) for t in inputs]
            self.eager_calls += 1
            return self.fn(*inputs)
        self._graphs.move_to_end(key)
        for static, value in zip(captured.inputs, inputs):
            static[:rows].copy_(value, non_blocking=True)
        captured.graph.replay()
        self.replays += 1
        return tuple(out[:rows] for out in captured.outputs)

    def is_captured(self, *inputs: torch.Tensor) -> bool:
        return self.enabled and self.key(inputs) in self._graphs

    @property
    def pending(self) -> int:
        return len(self._wanted)

    def capture_pending(self, limit: int | None = None) -> int:
        """Capture queued shapes (a few warm-up runs on a side stream, then the capture); how many were captured."""
        done = 0
        while self._wanted and (limit is None or done < limit):
            key, inputs = self._wanted.popitem(last=False)
            self._graphs[key] = self._capture(inputs)
            self.captures += 1
            done += 1
            while len(self._graphs) > self.capacity:
                self._graphs.popitem(last=False)
        return done

    def _capture(self, inputs: list[torch.Tensor]) -> Captured:
        with torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # cuDNN/cuBLAS pick their kernels before the capture
                for _ in range(2):
                    self.fn(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                outputs = self.fn(*inputs)
            self._pool = graph.pool()
        torch.cuda.synchronize()
        return Captured(graph, inputs, tuple(outputs))


def _padded(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """A copy of `tensor` with its first dimension filled up to `rows` by repeating its first row."""
    extra = rows - tensor.shape[0]
    if extra <= 0:
        return tensor.clone()
    return torch.cat([tensor, tensor[:1].expand(extra, *tensor.shape[1:])]).contiguous()
