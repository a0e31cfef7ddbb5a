"""Stand-in of modules/sd_samplers_common.py."""


class InterruptedException(BaseException):
    pass
