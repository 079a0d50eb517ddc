"""dip_ext: DISP-LLM dimension-independent structural pruning on fused C++/CUDA kernels.

Data flows one way: text -> calibration statistics -> masks -> compaction -> patched model -> eval / save.

    model, report = dip_ext.prune_and_compact(model, tokenizer)   # or stage by stage: dip_ext.Pruner
    masks = dip_ext.DispMasks.from_dict({...})      # or masks by hand
    dip_ext.compact(model, masks)                   # in place; runs on dip_ext kernels
    model.save_pretrained(dir); dip_ext.from_pretrained(dir)
"""

import torch  # noqa: F401  (loads libtorch before our extension, which links against it)

try:
    from . import _C  # noqa: F401  (registers torch.ops.dip_ext.*)
except ImportError as _e:  # pragma: no cover - depends on how the package was installed
    import os as _os

    raise ImportError(
        f"dip_ext's compiled extension (_C) is missing next to {_os.path.dirname(__file__)}. If that is the source "
        "checkout, it shadows the installed package: run from another directory, or install it editable "
        "(pip install --no-build-isolation -e .). Otherwise build it: pip install --no-build-isolation .") from _e
from . import ops
from .ops import build_info
from .compaction import compact, is_compacted, require_dense
from .errors import LegacyOnnxExportError, MaskError, UnsupportedModelError
from .masking import MaskedModel, apply_masks
from .masks import STRUCTURES, DispMasks, ModelDims
from .space import PrunableSpace, Structure
from .modeling import from_pretrained, register_classes
from .onnx_export import export_onnx
from .export_decilm import export_decilm
from .export_gguf import export_gguf
from .zero_pad import ExportReport
from .params import ParamReport, param_report
from .config import EvalConfig, PruneConfig, RefitConfig
from .pipeline import CompactionResult, Evaluation, Pruner
from .prune import prune_and_compact
from .recovery import RecoveryConfig
from .refit import RefitResult
from .report import PruneReport
from .run_configs import RunConfigs
from .selftest import SelftestResult, selftest
from .selection import (HypernetworkConfig, SelectionInputs, SelectionResult, TrainingSummary, get_method,
                        method_names, register_method)

__version__ = "0.1.0"

register_classes()  # AutoConfig / AutoModelForCausalLM (and peft, if installed) learn the compacted classes


__all__ = ["ops", "build_info", "__version__", "selftest", "SelftestResult",
           # the pipeline: one call, or its stages one by one
           "prune_and_compact", "Pruner", "PruneConfig", "RefitConfig", "EvalConfig", "HypernetworkConfig",
           "RecoveryConfig",
           "PruneReport", "RunConfigs", "Evaluation", "CompactionResult", "RefitResult",
           # selection methods
           "register_method", "get_method", "method_names", "SelectionInputs", "SelectionResult", "TrainingSummary",
           # masks, the masked reference, compaction, loading
           "DispMasks", "ModelDims", "PrunableSpace", "Structure", "STRUCTURES", "apply_masks", "MaskedModel",
           "compact", "is_compacted", "require_dense", "from_pretrained", "param_report", "ParamReport", "MaskError", "UnsupportedModelError",
           # ONNX
           "export_onnx", "LegacyOnnxExportError",
           # zero-padded exports for engines that cannot run index sets (vLLM's DeciLM, llama.cpp)
           "export_decilm", "export_gguf", "ExportReport"]
