"""A model's parameters and floating-point buffers as views into ONE contiguous buffer.

Layout of ``FlatModel.data`` (1-D, float32 on the model's device, optionally in shared memory):

    [ param_0 | param_1 | ... | param_{P-1} | float_buffer_0 | ... ]
      <------------- n_params ------------>   <-- n_buffers -->

Every ``nn.Parameter`` and floating buffer (BatchNorm running statistics) of the module is
re-pointed at its slice, so an averaging round is one collective on ``data`` and the optimizer
is one fused update on ``params``. PyTorch's own averagers flatten by copying every round and
skip buffers; here the views persist and buffers are averaged too. ``grad`` mirrors the
parameter part, and every ``p.grad`` is a view into it, so gradient averaging is also one call.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from hpc_asgd.errors import ConfigError


class FlatModel:
    """``FlatModel(module)`` copies the module's values into a new flat buffer;
    ``FlatModel(module, data=shared)`` adopts an existing one (a worker process re-pointing its
    freshly built module at the rank's shared buffer) without copying."""

    def __init__(
        self,
        module: nn.Module,
        *,
        shared: bool = False,
        device: torch.device | str = "cpu",
        data: torch.Tensor | None = None,
    ):
        module.to(device)
        params = list(module.parameters())
        buffers = [
            (m, name, b)
            for m in module.modules()
            for name, b in m._buffers.items()
            if b is not None and b.is_floating_point()
        ]
        dtypes = {str(t.dtype) for t in [*params, *(b for *_, b in buffers)]}
        odd = sorted(dtypes - {"torch.float32"})
        if odd:  # re-pointing them at float32 views would change their dtype behind your back
            raise ConfigError(
                f"model: its parameters and floating buffers must be float32 (one float32 flat "
                f"buffer holds them all), found {', '.join(odd)}; use autocast for lower "
                "precision, not low-precision parameters"
            )
        self.module = module
        self.n_params = sum(p.numel() for p in params)
        self.n_buffers = sum(b.numel() for _, _, b in buffers)
        n = self.n_params + self.n_buffers
        adopt = data is not None
        if data is not None and data.numel() != n:
            raise ValueError(f"flat buffer has {data.numel()} elements, the model needs {n}")
        self.data = data if data is not None else torch.zeros(n, dtype=torch.float32, device=device)
        self.grad = torch.zeros(self.n_params, dtype=torch.float32, device=device)
        if shared and not adopt:
            self.data.share_memory_()
        self._params = params
        self._buffers = [b for *_, b in buffers]
        self.param_slices: list[slice] = []  # where each parameter lives in ``params``
        off = 0
        for p in params:
            k = p.numel()
            if not adopt:
                self.data[off : off + k].copy_(p.detach().reshape(-1))
            p.data = self.data[off : off + k].view_as(p)
            p.grad = self.grad[off : off + k].view_as(p)
            self.param_slices.append(slice(off, off + k))
            off += k
        # what ``gather_grads`` re-points the parameters' gradients to
        self._grad_views = [
            self.grad[sl].view_as(p) for p, sl in zip(params, self.param_slices, strict=True)
        ]
        for i, (m, name, b) in enumerate(buffers):
            k = b.numel()
            if not adopt:
                self.data[off : off + k].copy_(b.reshape(-1))
            m._buffers[name] = self._buffers[i] = self.data[off : off + k].view_as(b)
            off += k
        self.params = self.data[: self.n_params]  # the optimizer's view
        self.bound = self.params  # the ``(n_params,)`` tensor the module's parameters view now
        # data_ptr -> (tensor, its per-parameter views): Leashed-SGD's workers rebind to one of
        # a few version slots every step; making the views took 49 us a step, reusing 3 us
        self._views: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    def bind_params(self, params: torch.Tensor) -> None:
        """Point the module's parameters at ``params`` ``(n_params,)`` (a private copy or an
        immutable version of an update rule); buffers stay in the flat buffer."""
        if params is self.bound:
            return
        hit = self._views.get(params.data_ptr())
        if hit is None or hit[0].numel() != params.numel() or hit[0].device != params.device:
            slices = zip(self._params, self.param_slices, strict=True)
            hit = (params, [params[sl].view_as(p) for p, sl in slices])
            # only views of a longer-lived buffer (a pool's slots): caching fresh tensors
            # would keep them alive
            if params._base is not None and len(self._views) < 64:
                self._views[params.data_ptr()] = hit
        for p, v in zip(self._params, hit[1], strict=True):
            p.data = v
        self.bound = params

    def only_grads_for(self, block: slice | None) -> None:
        """Partial backprop: gradients only for parameters overlapping ``block`` (None: all)."""
        for p, sl in zip(self._params, self.param_slices, strict=True):
            p.requires_grad_(block is None or (sl.start < block.stop and block.start < sl.stop))

    def zero_grad(self) -> None:
        self.grad.zero_()

    def gather_grads(self) -> None:
        """Bring every parameter's gradient into the flat gradient buffer, ``grad``, and point
        ``p.grad`` back at its view there: ``zero_grad(set_to_none=True)`` (torch's default)
        leaves ``p.grad`` None, and the next backward gives each parameter a tensor of its own.
        A parameter without a gradient counts as zeros."""
        for p, view in zip(self._params, self._grad_views, strict=True):
            g = p.grad
            if g is None:
                view.zero_()
            elif g.data_ptr() != view.data_ptr():
                view.copy_(g)
            else:
                continue
            p.grad = view

    def tensors(self) -> list[torch.Tensor]:
        """The parameters, then the floating buffers, in the flat buffer's order."""
        return [*self._params, *self._buffers]

    def checksum(self) -> str:
        """SHA-256 of the whole flat buffer's bytes (parameters and buffers)."""
        return hashlib.sha256(self.data.detach().cpu().numpy().tobytes()).hexdigest()

    def __len__(self) -> int:
        return self.data.numel()
