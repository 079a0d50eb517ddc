"""Mask selection: from calibration statistics to DispMasks that meet a parameter budget.

Methods implement :class:`SelectionMethod` and are registered by name below; a new method is one new file
plus one ``register_method`` line (here, or in the user's own code).
"""

from .base import SelectionInputs, SelectionMethod, SelectionResult, TrainingSummary
from .budget import Budget, check_ratio, fit_layer_widths, fit_multiple, widths_of
from .hypernetwork import Hypernetwork, HypernetworkConfig
from .oneshot import Dependent, OneShot
from .registry import get_method, method_names, method_options, register_method, unregister_method

register_method(Hypernetwork)
register_method(OneShot)
register_method(Dependent)

__all__ = ["Budget", "check_ratio", "widths_of", "fit_multiple", "fit_layer_widths", "SelectionInputs",
           "SelectionMethod", "SelectionResult", "TrainingSummary", "register_method", "unregister_method", "get_method",
           "method_names", "method_options", "OneShot", "Dependent", "Hypernetwork", "HypernetworkConfig"]
