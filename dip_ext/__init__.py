"""dip_ext: DISP-LLM dimension-independent structural pruning on fused C++/CUDA kernels.

Data flows one way: text -> calibration statistics -> masks -> compaction -> patched model -> eval / save.
"""

import torch  # noqa: F401  (loads libtorch before our extension, which links against it)

from . import _C  # noqa: F401  (registers torch.ops.dip_ext.*)
from . import ops

__version__ = "0.1.0"


def build_info() -> dict:
    """What the compiled extension was built with: version, torch version, CUDA archs, OpenMP."""
    return dict(_C.build_info())


__all__ = ["ops", "build_info", "__version__"]
