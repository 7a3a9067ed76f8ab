"""Names a user chooses among, as data: no torch, so the command line lists them in its help without
importing the code behind them (`blip2.quantize` implements the schemes, `blip2.precision` the policies)."""

from __future__ import annotations

SCHEMES = ("int8", "int8-dynamic", "int8-weight-only", "int4", "bnb-int8", "bnb-nf4")  # blip2.quantize
POLICIES = ("auto", "original", "cast")  # blip2.precision: dtype per module under fp16 / bf16 on CUDA
