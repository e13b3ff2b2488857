"""Linear projections, with the weights prepacked for oneDNN on CPU.

On CPU in fp32, `F.linear` goes through MKL's sgemm, whose calls with two rows or more cost about twice
a one-row call on the embedded models' shapes (a matrix-matrix path that packs the weights, against a
matrix-vector one): verifying 2..9 tokens of one request cost 1.2x-1.8x a one-token step, which made
speculation look dear exactly where it should be cheap. oneDNN's matmul on a weight reordered
once at load (`torch.ops.mkldnn`, the kernels torch.compile's CPU backend uses) makes the embedded
target's whole step 1.1x-1.8x faster, and a 9-token batch-1 verify 1.2x a one-token step instead of 1.7x
(docs/benchmarks.md). Its values differ from MKL's by fp32 rounding only (about 1e-6 per
projection), and a row's output does not depend on how many rows share the call (tested).

The plain weight stays beside the packed one (the embedding lookup and Medusa's initialisation read
it), so prepacked projections hold twice their memory; on a CPU model that fits this machine that is
the price of the speed. Elsewhere (CUDA, bf16 or fp16, a torch built without oneDNN) the projection
is `F.linear`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# oneDNN compiles a kernel per matmul shape, and a projection's shape is the number of rows it gets:
# the tokens of the whole batch, which in serving takes every value from 1 to a few hundred (batch
# sizes times chain lengths, prompt chunks). Its cache of compiled kernels holds 1024 by default, too
# few for that many row counts times the model's distinct projections: it evicts what the next steps
# need again, and a recompiled kernel costs 1-3 ms on a 6-15 ms step on two CPU cores
# (bench/primitive_cache.py, in git history: cycling through 1..160 rows, later passes were as slow as the first with
# the default and took 0.83x the time with 8192 entries, for ~0.5 MB more resident memory per row count
# held). oneDNN reads the variable when it first builds a kernel, so it is set here, before any weight
# is packed; an operator's own setting wins.
PRIMITIVE_CACHE_CAPACITY = 8192
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(PRIMITIVE_CACHE_CAPACITY))

import torch  # after the cache setting above
import torch.nn.functional as F


def can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether weights of this device and dtype can take the oneDNN path."""
    return (
        device.type == "cpu"
        and dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


@dataclass(frozen=True)
class Linear:
    """y = x W^T + b for x of shape [rows, in_features]."""

    weight: torch.Tensor  # [out, in], the plain layout (what other code may read)
    bias: torch.Tensor | None = None  # [out]
    packed: torch.Tensor | None = None  # the weight reordered for oneDNN; None = F.linear

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, prepack: bool = False) -> Linear:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight) if prepack else None
        return cls(weight, bias, packed)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
