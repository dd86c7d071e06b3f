"""Graph passes: each is a typed function over a GraphModule returning a PassResult."""

from .runner import PassResult, run_pass

__all__ = ["PassResult", "run_pass"]
