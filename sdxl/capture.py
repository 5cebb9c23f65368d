"""Faster UNet work on a GPU, as passes over plain code: CUDA graphs and regional compilation.

On a GPU, SDXL's training step is bound by the host, not the chip: its backward pass (autograd,
checkpoint recomputation, the adapters' autograd Functions) launches thousands of small kernels, a
few microseconds each. A CUDA graph records the kernels of one call and launches them all again with
one `replay()`: on an H200 the LoRA step at 1024 px took 164 ms replayed against 634 ms eager
(ADVANCED.md, "Measured on a GPU"). `Graphed` does that for any function of tensors, one graph per
input shape; `compile_blocks` adds torch.compile's kernel fusion on the repeated blocks.

What a captured function may do (PyTorch's "CUDA Graphs" notes): only device work. No value read
back to the host, no tensor made from host data, no Python decision on tensor values, and the same
tensors at the same addresses on every replay: its inputs are copied into fixed buffers, its outputs
are fixed tensors (copied out here), and what it updates in place (parameters, gradients, optimizer
state, the learning-rate tensor) keeps its storage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

import torch

Outputs = TypeVar("Outputs")  # a tensor, or a tuple of tensors
Signature = tuple[tuple[tuple[int, ...], tuple[int, ...], torch.dtype, torch.device], ...]


def signature(inputs: tuple[torch.Tensor, ...]) -> Signature:
    """What a graph is specific to: each input's shape, strides, dtype and device."""
    return tuple((tuple(x.shape), x.stride(), x.dtype, x.device) for x in inputs)


def _copy(outputs: Outputs) -> Outputs:
    if isinstance(outputs, torch.Tensor):
        return cast(Outputs, outputs.clone())
    return cast(Outputs, tuple(x.clone() for x in outputs))  # type: ignore[attr-defined]


@dataclass
class _Entry(Generic[Outputs]):
    inputs: tuple[torch.Tensor, ...]  # the static input buffers
    graph: torch.cuda.CUDAGraph | None
    outputs: Outputs | None  # the graph's static outputs


class Graphed(Generic[Outputs]):
    """`fn(*tensors)` replayed as CUDA graphs: one per input signature (aspect-ratio buckets give
    several), all in one memory pool, since they never run at the same time.

    The first call with a new signature is the warm-up (lazy initialisations, cuDNN's choices,
    torch.compile's compiling, the optimizer's state): it runs `fn` eagerly on a side stream, and
    its result is this call's result. Then the graph is captured (recording runs nothing) and every
    later call with that signature copies its inputs into the graph's buffers and replays it.
    Results are copies, so a caller may keep them across calls.

    With `capture=False` the same path runs without graphs (inputs copied into the buffers, `fn`
    run on them): on the CPU, that is how the plumbing is tested."""

    def __init__(self, fn: Callable[..., Outputs], capture: bool, label: str | None = None):
        self.fn: Callable[..., Outputs] = fn
        self.capture = capture
        self.label = label  # printed with each new signature; None: silent
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.entries: dict[Signature, _Entry[Outputs]] = {}

    def __call__(self, *inputs: torch.Tensor) -> Outputs:
        key = signature(inputs)
        entry = self.entries.get(key)
        if entry is None:
            return self._first_call(key, inputs)
        for buffer, x in zip(entry.inputs, inputs):
            buffer.copy_(x)
        if entry.graph is None:
            return self.fn(*entry.inputs)
        entry.graph.replay()
        return _copy(cast(Outputs, entry.outputs))

    @property
    def captured(self) -> int:
        return sum(entry.graph is not None for entry in self.entries.values())

    def _first_call(self, key: Signature, inputs: tuple[torch.Tensor, ...]) -> Outputs:
        buffers = tuple(x.clone() for x in inputs)  # clone keeps the layout (channels_last)
        start = time.perf_counter()
        if not self.capture:
            result = self.fn(*buffers)
            self.entries[key] = _Entry(buffers, None, None)
            self._report(inputs, time.perf_counter() - start, None)
            return result
        # Warm up on a side stream, as PyTorch's notes say: the capture then starts from a state
        # in which nothing is initialised lazily.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            result = self.fn(*buffers)
        torch.cuda.current_stream().wait_stream(side)
        result = _copy(result)
        warm = time.perf_counter() - start
        graph = torch.cuda.CUDAGraph()
        # torch.cuda.graph synchronizes and empties the allocator's cache first. One warm-up call:
        # it makes what is made lazily (AdamW's state, cuBLAS and cuDNN's choices, the compiling);
        # more would be more real steps. A capture that fails (torch before 2.10 cannot capture
        # the checkpointing's RNG state; a kernel may not be capturable) leaves nothing changed,
        # since capturing runs no kernel: this function then runs eagerly from here on.
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                outputs = self.fn(*buffers)
        except RuntimeError as e:
            self.capture = False
            reason = str(e).strip().splitlines()[0][:200]
            print(f"{self.label or 'CUDA graph'}: capture failed ({reason}); running eagerly")
            self.entries[key] = _Entry(buffers, None, None)
            return result
        self.entries[key] = _Entry(buffers, graph, outputs)
        self._report(inputs, warm, time.perf_counter() - start - warm)
        return result

    def _report(self, inputs: tuple[torch.Tensor, ...], warm: float, capture: float | None) -> None:
        if self.label is None:
            return
        shape = "x".join(str(n) for n in inputs[0].shape)
        graph = f", captured in {capture:.1f} s" if capture is not None else ""
        counts = f"shapes: {len(self.entries)}" + (f", CUDA graphs: {self.captured}" * self.capture)
        print(f"{self.label}: new input shape {shape}: first run {warm:.1f} s{graph}; {counts}")


def compile_blocks(unet: torch.nn.Module, backend: str = "inductor") -> None:
    """torch.compile the UNet's repeated blocks (regional compilation): each ResNet and
    transformer block is compiled as a unit, and blocks of the same shape share the compiled code,
    so compiling takes a few dozen small graphs instead of one whole-UNet graph. A block seen with a
    second shape is recompiled once with dynamic sizes (torch's default). Call it last, after the
    adapters and gradient checkpointing are in place. `backend`: torch.compile's (inductor fuses
    kernels; aot_eager only traces, which is quick to check on a CPU)."""
    import torch._dynamo

    # SDXL's blocks come in a few dozen variants (kind, width, checkpointed or not): the default
    # limit of 8 compiled variants per function would leave the rest eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for module in unet.checkpoint_units():  # type: ignore[operator]
        module.compile(backend=backend)
