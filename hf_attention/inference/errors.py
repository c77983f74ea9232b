"""The errors every engine of the inference wing shares."""


class ExportError(ValueError):
    """A model, option or environment that an export (CTranslate2, ONNX) cannot serve, named in one line."""
