"""Peak bytes of tensor memory allocated inside a region, measured by
instrumenting torch's dispatcher (works for CPU tensors, where torch keeps no
allocator statistics).

Every op output that does not alias an input (per the op's schema: views and
in-place/out= results are not new memory) is counted from the moment it is
returned until its storage is freed (a weakref finalizer on the storage). The
custom ops of this package are re-dispatched with the tracker active, so the
buffers allocated inside their implementations (chunk logits, accumulators)
are counted too. Memory that does not go through torch ops (e.g. numpy arrays
inside the Triton interpreter) is not seen.

A DTensor (FSDP2's sharded parameters, gradients and optimizer state) is
counted by its local tensor, not by the wrapper's logical size. With
``follow_resize=True`` storages resized in place (``UntypedStorage.resize_``,
which FSDP2 uses to free and re-allocate gathered parameters) are followed.
"""
from __future__ import annotations

import weakref

import torch
from torch.distributed.tensor import DTensor
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

TRACED_NAMESPACES = ("olmo2_kernels",)


class PeakAllocations(TorchDispatchMode):
    """``with PeakAllocations() as mem: ...`` then ``mem.peak`` (bytes).

    ``mem.live`` is the number of tracked bytes still alive.
    """

    def __init__(self, follow_resize: bool = False) -> None:
        super().__init__()
        self._sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0
        self.follow_resize = follow_resize
        self._depth = 0
        self._real_resize = None

    def __enter__(self):
        self._depth += 1  # re-entered around our own ops' implementations
        if self.follow_resize and self._depth == 1:
            self._real_resize = torch.UntypedStorage.resize_
            tracker = self

            def resize_(storage, nbytes):
                before = storage.nbytes()
                out = tracker._real_resize(storage, nbytes)
                key = id(storage)
                if key in tracker._sizes:
                    delta = storage.nbytes() - before
                    tracker._sizes[key] += delta
                    tracker.live += delta
                    tracker.peak = max(tracker.peak, tracker.live)
                return out

            torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0 and self._real_resize is not None:
            torch.UntypedStorage.resize_ = self._real_resize
            self._real_resize = None
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in TRACED_NAMESPACES:
            # Run the implementation with the tracker on, to see its internals.
            keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
            with self:
                out = func.redispatch(keys, *args, **kwargs)
        else:
            out = func(*args, **kwargs)
        outs = out if isinstance(out, (tuple, list)) and len(func._schema.returns) > 1 else (out,)
        for ret, value in zip(func._schema.returns, outs):
            if ret.alias_info is not None:
                continue
            for t in pytree.tree_leaves(value):
                if isinstance(t, DTensor):
                    t = t._local_tensor
                if isinstance(t, torch.Tensor):
                    self._track(t.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        nbytes = storage.nbytes()
        # Storages keep their Python object while alive; its id survives a resize_ (data_ptr does not).
        key = id(storage)
        if nbytes == 0 or key in self._sizes:
            return
        self._sizes[key] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)
