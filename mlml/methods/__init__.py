"""Methods: registered training procedures. Importing this package registers the built-in ones."""

from mlml.methods.base import METHODS, Method, MethodContext, method_views, register_method
from mlml.methods import supervised  # noqa: F401  (registers "supervised")
from mlml.methods import single_positive  # noqa: F401  (registers "role", "em_apl", "ll_r", "ll_ct", "ll_cp", "splc")
from mlml.methods import grouped  # noqa: F401  (registers "grouped")

__all__ = ["METHODS", "Method", "MethodContext", "register_method", "build_method", "method_views"]


def build_method(cfg, ctx: MethodContext) -> Method:
    """The method named `cfg.name`, built from its config and the run's context."""
    return METHODS.get(cfg.name)(cfg, ctx)
