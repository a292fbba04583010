"""phiforge: open Phi-2 model code and training from scratch."""

__version__ = "0.1.0"
