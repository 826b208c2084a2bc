"""rissole-edge: generate images on a CPU with a tiny retrieval-guided block diffusion model.

The runtime imports only onnxruntime, numpy, hnswlib and pillow. The training and export
toolchain is the separate `rissole_export` package (`pip install '.[export]'` in a clone).
"""

from .errors import DataError, RissoleError, ToolchainMissing, UsageError

__version__ = "0.1.0"
__all__ = ["RissoleError", "UsageError", "DataError", "ToolchainMissing", "__version__"]
