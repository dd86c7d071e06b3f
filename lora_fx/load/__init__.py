"""Load: a MODEL spec (a model file or a plugin spec such as ``hf:DIR``) into a module and example
inputs. Plugins return :class:`LoadedModel`."""

from .model import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model"]
