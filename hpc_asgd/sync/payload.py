"""Compressed rounds: the parameters' change since the last global model, sent in 16 bits.

A round normally allreduces the whole float32 model. What the ranks need to agree on is much
smaller in magnitude: each rank's change since the last global model ``x_g``, which tolerates
a 16-bit float (Horovod's ``Compression.fp16``, torchft's quantized DiLoCo). Per round, on each
rank (``(n_params,)`` tensors):

    payload  = x - x_g + residual          # float32; the residual: what earlier rounds lost
    wire     = payload in bf16 / fp16      # rounded to nearest; the allreduce sums these
    residual = payload - wire              # error feedback (Seide et al. 2014; Karimireddy
                                           # et al. 2019): the next round sends it again
    mean     = x_g + sum(wire) / ranks     # float32, then the outer step (or x_g = mean)

so over many rounds the ranks' sum of what was sent differs from the float32 sum by the
rounding of ONE round, not of all of them. BatchNorm statistics and the rounds' flags travel
in float32 beside it (a second, small collective); the run's final exact average is float32
as always, so every rank still ends with the same bits. Memory: the residual and the wire
buffer (1.5 copies of the parameters) besides the global model.

Engines: Gloo and NCCL sum 16-bit floats natively; MPI through an operation of its own that
adds in float32 and rounds once per addition; Horovod sums fp16 but refuses bf16.
"""

from __future__ import annotations

from typing import Any

import torch

from hpc_asgd.errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CHOICES = ("fp32", *DTYPES)


class Payload:
    def __init__(self, dtype: str, n_params: int):
        if dtype not in DTYPES:
            raise ConfigError(f"avg_dtype: one of {', '.join(DTYPES)}, got {dtype!r}")
        self.name, self.dtype = dtype, DTYPES[dtype]
        self.residual = torch.zeros(n_params, dtype=torch.float32)
        self.wire = torch.zeros(n_params, dtype=self.dtype)

    def pack(self, params: torch.Tensor, x_g: torch.Tensor) -> torch.Tensor:
        """The wire tensor of this round (this object's: allreduce it in place, sum)."""
        payload = params - x_g
        payload += self.residual
        self.wire.copy_(payload)  # round to nearest, in 16 bits
        self.residual.copy_(payload).sub_(self.wire)  # what this round did not send
        return self.wire

    def mean(self, x_g: torch.Tensor, size: int) -> torch.Tensor:
        """After the allreduce: the ranks' mean parameters, ``x_g + sum / size``, float32."""
        return x_g + self.wire.to(torch.float32).div_(size)

    def state_dict(self) -> dict[str, Any]:
        return {"dtype": self.name, "residual": self.residual}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.residual.copy_(state["residual"])


def payload_of(dtype: str, n_params: int) -> Payload | None:
    """The payload ``avg_dtype`` asks for; None for float32 (the model itself on the wire)."""
    if dtype == "fp32":
        return None
    return Payload(dtype, n_params)
