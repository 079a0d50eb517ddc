"""Mask selection: from calibration text to DispMasks that meet a parameter budget."""

from .budget import Budget, check_ratio, widths_of

__all__ = ["Budget", "check_ratio", "widths_of"]
