"""The error of MoEfication: an argument, configuration or model it cannot use as given."""
from configurable_fm.errors import ConfigError


class MoefyError(ConfigError):
    """A MoEfication argument or model that cannot be used as given; the message names it (a ConfigError, hence a
    UserError and a ValueError)."""
