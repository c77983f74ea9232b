"""The errors every engine of the inference wing shares."""


class ExportError(ValueError):
    """A model, option or environment that an export (CTranslate2, ONNX) cannot serve, named in one line."""


class TranslationError(ValueError):
    """Bad input to an engine or the translate command (a flag, a file, a line), named in one line."""
