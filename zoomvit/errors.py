"""The errors a user can act on: the app and the CLI show their message as is, without a traceback."""


class ZoomViTError(Exception):
    """An error a user can act on; the app and the CLI show its message as is, without a traceback."""


class ImageLoadError(ZoomViTError):
    pass


class ModelLoadError(ZoomViTError):
    pass
