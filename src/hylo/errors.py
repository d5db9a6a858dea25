"""InvalidParam: a request value hylo refuses, naming its field (apart so that every module can raise it)."""

from __future__ import annotations


class InvalidParam(ValueError):
    """A request value out of its allowed range; `param` names the field (the server's 400 carries it)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
