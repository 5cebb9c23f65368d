"""GPU memory without a GPU: a run's phases traced on the meta device, and what PyTorch's CUDA caching
allocator reserves for them (`torch.cuda.max_memory_reserved`).

The preflights (training/preflight.py, sampling/preflight.py) run the run's own functions in the
run's order on models built on the meta device from their configs: no weights, no data, no GPU;
the meta device stands for the GPU. `MemoryTrace` watches them:
- every aten op's new output storage on the device is counted from its creation until it is freed,
  rounded up to 512 bytes as the allocator rounds each block;
- on the device are: the outputs of an op with an input there, or with no meta input at all (a
  factory, a copy from the host), but not what a module on the host computes; and the modules the
  run moves there with `.to(device)`, until it moves them back to "cpu" (the models arriving and
  leaving, as the run moves them);
- the default pool keeps what it has reserved until `empty_cache`, which `torch.cuda.graph` calls
  before each capture; a CUDA graph's private pool keeps, for the rest of the run, the peak of what
  its capture allocated (graphs are simulated: `simulated_cuda_graphs`);
- attention runs as the memory-efficient kernels do (on the meta device the math fallback would make
  N x N scores): the output and an fp32 log-sum-exp saved, and in backward the gradients of q, k, v
  beside an fp32 accumulator;
- the workspaces of cuBLAS and cuDNN, and the allocator's rounding of segments, are one allowance
  (WORKSPACE), calibrated against an H200 (ADVANCED.md, section 5).

predicted max_memory_reserved = the high-water mark of (default pool + graph pools) + WORKSPACE.
"""

from __future__ import annotations

import contextlib
import importlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

MiB, GiB = 2**20, 2**30
BLOCK = 512  # the caching allocator rounds every block up to a multiple of 512 bytes
# cuBLAS and cuDNN workspaces and segment rounding: the step traced at 1024 px (LoRA, checkpointing)
# came to 509 MiB against 568 MiB measured on an H200, 4,974 + 44 against 4,988 without
# checkpointing (ADVANCED.md, section 5): 64 MiB covers the first gap.
WORKSPACE = 64 * MiB


# How the report names the models that move.
LABELS = {
    "UNet2DConditionModel": ("the UNet", False),
    "SDXLTextEncoder": ("the text encoders", True),
    "SDXLVAE": ("the VAE", False),
    "Encoder": ("the VAE's encoder", False),
}


OTHER = "(other set-up)"  # the row of what no phase names

_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in an op's arguments or outputs (nested lists, tuples and dicts)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _signature(value: Any) -> Any:
    """A hashable description of an op's arguments, or None if one is of a kind not described:
    tensors by shape, strides and dtype (what a meta kernel's outputs depend on)."""
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.stride(), value.dtype, value.device.type)
    if isinstance(value, _PLAIN) or callable(value) and hasattr(value, "_schema"):
        return value
    if isinstance(value, list | tuple):
        parts = [_signature(v) for v in value]
        return (
            None if any(p is None and v is not None for p, v in zip(parts, value)) else tuple(parts)
        )
    if isinstance(value, dict):
        return _signature(tuple(sorted(value.items(), key=lambda kv: kv[0])))
    return None


def _rounded(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


@dataclass
class Pool:
    """A CUDA graph's private pool: what its capture allocated stays reserved."""

    live: int = 0
    peak: int = 0


@dataclass
class Phase:
    """One row of the report: the phase, device memory live at its end, and the predicted
    max_memory_reserved so far."""

    name: str
    live: int
    reserved: int
    peak_in_phase: int


@dataclass
class MemoryTrace(TorchDispatchMode):
    """Device memory of the code run inside it (see the module docstring). Enter it, then run the
    phases each in `phase(name)`; `report()` prints one row a phase and the prediction."""

    device: torch.device = torch.device("meta")
    live: int = 0  # the default pool's live bytes
    reserved_default: int = 0  # what the default pool holds: its high-water since empty_cache
    pools: dict[Any, Pool] = field(default_factory=dict)
    peak: int = 0  # the high-water mark of default + pools
    phases: list[Phase] = field(default_factory=list)
    _owner: dict[int, tuple[int, Any]] = field(default_factory=dict)  # storage -> (bytes, pool)
    _pool: Any = None  # the pool new allocations go to (None: the default pool)
    _host_depth: int = 0  # > 0: inside the forward of a module on the host
    _host_hooks: dict[int, list] = field(default_factory=dict)
    _made: dict[Any, tuple] = field(default_factory=dict)  # what ops made, by signature (_run)
    _phase_peak: int = 0
    notes: list[str] = field(default_factory=list)  # what `modelled` added

    def __post_init__(self) -> None:
        super().__init__()

    # -- what is on the device -------------------------------------------------------------------

    def on_device(self, t: torch.Tensor) -> bool:
        return t.untyped_storage()._cdata in self._owner

    def allocate(self, t: torch.Tensor) -> None:
        """Count a new storage on the device (once; views share their base's)."""
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._owner or storage.nbytes() == 0:
            return
        n, pool = _rounded(storage.nbytes()), self._pool
        self._owner[key] = (n, pool)
        if pool is None:
            self.live += n
            self.reserved_default = max(self.reserved_default, self.live)
        else:
            p = self.pools.setdefault(pool, Pool())
            p.live += n
            p.peak = max(p.peak, p.live)
        self._update_peak()
        weakref.finalize(storage, self.free, key)

    def free(self, key: int) -> None:
        """A storage left the device (freed, or its module moved to the host)."""
        owned = self._owner.pop(key, None)
        if owned is None:
            return
        n, pool = owned
        if pool is None:
            self.live -= n
        else:
            self.pools[pool].live -= n

    def _enter_host(self) -> None:
        self._host_depth += 1

    def _leave_host(self) -> None:
        self._host_depth -= 1

    def reserved(self) -> int:
        return self.reserved_default + sum(p.peak for p in self.pools.values()) + WORKSPACE

    def _update_peak(self) -> None:
        now = self.reserved()
        self.peak = max(self.peak, now)
        self._phase_peak = max(self._phase_peak, now)

    def empty_cache(self) -> None:
        """torch.cuda.empty_cache(): the default pool gives back what is not live."""
        self.reserved_default = self.live

    @contextlib.contextmanager
    def pool(self, key: Any) -> Iterator[None]:
        """New allocations go to the graph pool `key` (a capture)."""
        before, self._pool = self._pool, key
        try:
            yield
        finally:
            self._pool = before

    # -- phases ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """A row of the report for the code run inside."""
        self.row(None)  # what came before it, if anything, is a row of its own
        yield
        self.row(name)

    def row(self, name: str | None) -> None:
        """End a row: `name`, the memory live now and the peak since the last row. Without a name,
        a row "(other set-up)" only if anything was allocated since the last one (and one such
        row, however many times it is ended in a row)."""
        if name is None and self._phase_peak == 0:
            return
        live = self.live + sum(p.live for p in self.pools.values())
        phase_peak = self._phase_peak or self.reserved()
        name = name or OTHER
        if name == OTHER and self.phases and self.phases[-1].name == OTHER:
            phase_peak = max(phase_peak, self.phases.pop().peak_in_phase)
        self.phases.append(Phase(name, live, self.peak, phase_peak))
        self._phase_peak = 0

    def modelled(self, name: str, delta: int, first: str) -> None:
        """What the trace could not run, modelled: `delta` bytes more (or fewer) in every phase
        from the one whose name starts with `first` on, and `name` among the report's notes."""
        start = next(i for i, p in enumerate(self.phases) if p.name.startswith(first))
        peak = self.phases[start - 1].reserved if start else 0
        for p in self.phases[start:]:
            p.live += delta
            p.peak_in_phase += delta
            peak = p.reserved = max(peak, p.peak_in_phase)
        self.peak = peak
        self.notes.append(f"{name}: {delta / GiB:+.2f} GiB from '{self.phases[start].name}' on")

    def report(self) -> str:
        rows = [f"{'phase (GiB)':58} {'live':>6} {'peak':>6} {'so far':>7}"]
        for p in self.phases:
            rows.append(
                f"{p.name:58} {p.live / GiB:6.2f} {p.peak_in_phase / GiB:6.2f} "
                f"{p.reserved / GiB:7.2f}"
            )
        rows += [f"modelled, not traced: {note}" for note in self.notes]
        rows.append(f"predicted max_memory_reserved: {self.peak / GiB:.2f} GiB")
        return "\n".join(rows)

    # -- the dispatch ------------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, op_args=(), op_kwargs=None):
        kwargs = op_kwargs or {}
        to_host = func is torch.ops.aten._to_copy.default and kwargs.get("device") is not None
        if to_host and torch.device(kwargs["device"]).type == "cpu" and op_args[0].is_meta:
            # A copy to the host (`.cpu()`): a meta tensor that is not on the device.
            dtype = kwargs.get("dtype") or op_args[0].dtype
            return torch.empty(op_args[0].shape, dtype=dtype, device=self.device)
        out = self._run(func, op_args, kwargs)
        if self._host_depth:
            return out  # what a module on the host computes
        meta_inputs = [t for t in _tensors((op_args, kwargs)) if t.device == self.device]
        # On the device: an input there, or no meta input at all (a factory, or a host copy).
        if not meta_inputs or any(self.on_device(t) for t in meta_inputs):
            for t in _tensors(out):
                if t.device == self.device:
                    self.allocate(t)
        return out

    def _run(self, func: Any, op_args: tuple, kwargs: dict) -> Any:
        """func(*op_args, **kwargs). On the meta device an op's outputs depend only on its
        inputs' shapes, strides and dtypes and its other arguments, and most of the time goes to
        working them out in Python: an op that makes new tensors (no output aliases an input) is
        worked out once per such signature, and made again as empty tensors (the UNet repeats its
        blocks, and a CUDA graph's capture repeats its warm-up)."""
        meta_only = all(t.is_meta for t in _tensors((op_args, kwargs)))
        if not meta_only or any(r.alias_info for r in func._schema.returns):
            return func(*op_args, **kwargs)
        key = _signature((func, op_args, kwargs))
        made = self._made.get(key) if key is not None else None
        if made is not None:
            tensors = [
                torch.empty_strided(shape, stride, dtype=dtype, device="meta")
                for shape, stride, dtype in made[0]
            ]
            return tree_unflatten(tensors, made[1])
        out = func(*op_args, **kwargs)
        leaves, spec = tree_flatten(out)
        if (
            key is not None
            and leaves
            and all(isinstance(t, torch.Tensor) and t.is_meta for t in leaves)
        ):
            self._made[key] = ([(t.shape, t.stride(), t.dtype) for t in leaves], spec)
        return out

    # -- modules moving ------------------------------------------------------------------------------

    def move(self, module: torch.nn.Module, device: torch.device) -> None:
        """`module.to(device)` of a meta module: its storages arrive on the device, or leave it for
        the host (a row of the report each, when anything moved; a part of a model, the VAE's
        quant_conv, without a row of its own: its bytes show in the next row)."""
        tensors = [*module.parameters(), *module.buffers()]
        before, phase_peak = self.live, self._phase_peak
        labelled = type(module).__name__ in LABELS
        if labelled:
            self.row(None)
        for handle in [h for m in module.modules() for h in self._host_hooks.pop(id(m), [])]:
            handle.remove()
        if device.type == self.device.type:
            with self.pool(None):
                for t in tensors:
                    self.allocate(t)
        elif device.type == "cpu":
            for t in tensors:
                self.free(t.untyped_storage()._cdata)
            # What its layers compute is on the host too, whatever the inputs' home.
            self._host_hooks[id(module)] = [
                hook
                for m in module.modules()
                for hook in (
                    m.register_forward_pre_hook(lambda *a: self._enter_host()),
                    m.register_forward_hook(lambda *a: self._leave_host()),
                )
            ]
        if not labelled:
            self._phase_peak = phase_peak
        elif self.live != before:
            name, plural = LABELS[type(module).__name__]
            what = (
                ("arrive" if plural else "arrives")
                if self.live > before
                else "leave" if plural else "leaves"
            )
            self.row(f"{name} {what}")

    def __enter__(self) -> MemoryTrace:
        super().__enter__()
        replacements = self._stand_ins()
        self._undo = [(owner, name, getattr(owner, name)) for owner, name, _ in replacements]
        for owner, name, value in replacements:
            setattr(owner, name, value)
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, value in reversed(self._undo):
            setattr(owner, name, value)
        self.row(None)
        super().__exit__(*exc)

    def _stand_ins(self) -> list[tuple[Any, str, Any]]:
        """What the trace replaces while it runs: (owner, attribute, replacement)."""
        trace, module_to = self, cast(Any, torch.nn.Module.to)

        def to(module: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
            """Module.to: a meta module's move is the trace's to count."""
            device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
            first = next(iter(module.parameters()), None)
            if device is None or first is None or first.device != trace.device:
                return module_to(module, *args, **kwargs)
            if dtype is not None:
                module_to(module, dtype)
            if memory_format is not None:
                module_to(module, memory_format=memory_format)
            trace.move(module, torch.device(device))
            return module

        # AdamW as on CUDA: capturable (its step counts on the device) and foreach (its
        # temporaries a list at a time), which it allows only for GPU devices.
        adam: Any = importlib.import_module("torch.optim.adam")
        devices = [*adam._get_capturable_supported_devices(), self.device.type]
        # Seeded noise on the device: torch has no meta generator; the numbers do not matter here.
        generator, randn = torch.Generator, torch.randn

        class AnyDevice(type):
            """torch.Generator, made on the host for the meta device (isinstance still works)."""

            def __instancecheck__(cls, obj: object) -> bool:
                return isinstance(obj, generator)

            def __call__(cls, device: Any = "cpu") -> torch.Generator:
                return generator("cpu" if torch.device(device).type == "meta" else device)

        meta_generator = AnyDevice("Generator", (), {})

        def meta_randn(*args: Any, generator: Any = None, device: Any = None, **kw: Any):
            meta = device is not None and torch.device(device).type == "meta"
            return randn(*args, generator=None if meta else generator, device=device, **kw)

        autocast = torch.autocast

        def meta_autocast(device_type: str, *args: Any, **kwargs: Any) -> Any:
            """CUDA's autocast, which the meta device does not have: `MetaAutocast`."""
            if device_type != "cuda":
                return autocast(device_type, *args, **kwargs)
            return MetaAutocast(kwargs.get("dtype", torch.bfloat16))

        unet: Any = importlib.import_module("sdxl.unet")
        return [
            (torch, "autocast", meta_autocast),
            (unet, "checkpoint", MetaAutocast.checkpoint(unet.checkpoint)),
            (torch.nn.Module, "to", to),
            (F, "scaled_dot_product_attention", efficient_attention),
            (adam, "_get_capturable_supported_devices", lambda *a, **k: devices),
            (adam, "_default_to_fused_or_foreach", lambda *a, **k: (False, True)),
            (torch, "Generator", meta_generator),
            (torch, "randn", meta_randn),
        ]


# ---------------------------------------------------------------------------------------------
# Stand-ins for what the meta device cannot show
# ---------------------------------------------------------------------------------------------


class _EfficientAttention(torch.autograd.Function):
    """The memory of the memory-efficient (and flash) attention kernels."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        log_sum_exp = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, log_sum_exp)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v, *_ = ctx.saved_tensors
        accumulator = torch.empty(q.shape, dtype=torch.float32, device=q.device)  # for dq
        del accumulator
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def efficient_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args, **kwargs):
    """F.scaled_dot_product_attention as the meta device should see it on a GPU."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _EfficientAttention.apply(q, k, v)
    return torch.empty_like(q)


class MetaAutocast(TorchFunctionMode):
    """torch.autocast("cuda") as the meta device should see it (it has no autocast of its own, so
    full fine-tuning's activations would be traced in fp32): the matrix products and convolutions
    take their floating inputs in the low dtype, the norms, softmax and losses in fp32, as CUDA's
    autocast lists them; what autograd saves for backward is then what a GPU saves."""

    LOW = {F.linear, F.conv2d, torch.matmul, torch.mm, torch.bmm, torch.baddbmm, torch.addmm,
           torch.Tensor.__matmul__, torch.einsum}  # fmt: skip
    FP32 = {F.group_norm, F.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax,
            F.mse_loss, F.l1_loss, F.huber_loss, F.smooth_l1_loss}  # fmt: skip

    active: list[MetaAutocast] = []  # the modes in force, innermost last

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __enter__(self) -> MetaAutocast:
        MetaAutocast.active.append(self)
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        MetaAutocast.active.pop()
        super().__exit__(*exc)

    @staticmethod
    def checkpoint(checkpoint: Callable) -> Callable:
        """torch.utils.checkpoint as it behaves under CUDA's autocast: the recompute in backward
        runs under the autocast of the forward (here, `MetaAutocast` again)."""

        def recomputed_alike(fn: Callable, *args: Any, **kwargs: Any) -> Any:
            if not MetaAutocast.active:
                return checkpoint(fn, *args, **kwargs)
            dtype = MetaAutocast.active[-1].dtype
            contexts = lambda: (contextlib.nullcontext(), MetaAutocast(dtype))  # noqa: E731
            return checkpoint(fn, *args, context_fn=contexts, **kwargs)

        return recomputed_alike

    def __torch_function__(self, func, types, op_args=(), op_kwargs=None):
        kwargs = op_kwargs or {}
        to = self.dtype if func in self.LOW else torch.float32 if func in self.FP32 else None
        if to is not None:

            def cast(x: Any) -> Any:
                floating = isinstance(x, torch.Tensor) and x.is_floating_point()
                return x.to(to) if floating and x.dtype != torch.float64 else x

            flat, spec = tree_flatten((op_args, kwargs))
            op_args, kwargs = tree_unflatten([cast(x) for x in flat], spec)
        return func(*op_args, **kwargs)


class _Stream:
    def wait_stream(self, other: object) -> None:
        pass


class _Graph:
    def replay(self) -> None:
        pass  # a replay writes into the graph's own memory: nothing new is allocated


@contextlib.contextmanager
def simulated_cuda_graphs(trace: MemoryTrace) -> Iterator[None]:
    """sdxl/capture.py's CUDA graphs on the meta device: the warm-up runs as it does, the capture
    empties the default pool's cache and runs the function into the graph's pool, and a replay
    allocates nothing. What `Graphed` does with its buffers and outputs runs unchanged."""
    names = ("graph_pool_handle", "Stream", "stream", "current_stream", "CUDAGraph", "graph")
    saved = {name: getattr(torch.cuda, name) for name in names}
    handles = iter(range(1, 1 << 30))

    @contextlib.contextmanager
    def graph(cuda_graph: object, pool: object = None, **kwargs: object) -> Iterator[None]:
        trace.empty_cache()
        with trace.pool(pool if pool is not None else object()):
            yield

    replacements: dict[str, Callable] = {
        "graph_pool_handle": lambda: next(handles),
        "Stream": _Stream,
        "stream": lambda s: contextlib.nullcontext(),
        "current_stream": _Stream,
        "CUDAGraph": _Graph,
        "graph": graph,
    }
    for name, fn in replacements.items():
        setattr(torch.cuda, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.cuda, name, fn)


def nbytes(tensors: Iterator[torch.Tensor] | list[torch.Tensor]) -> int:
    """The bytes of the tensors' storages, each counted once."""
    seen: dict[int, int] = {}
    for t in tensors:
        seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
    return sum(seen.values())
