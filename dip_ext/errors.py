"""Exceptions raised by dip_ext (all subclasses of the builtin a caller would expect)."""


class UnsupportedModelError(ValueError):
    """The model's architecture (or a variant of it) is not supported by any family adapter."""


class MaskError(ValueError):
    """Masks do not fit the model: wrong layer count, out-of-range or duplicate indices, wrong keys."""
