"""Graph passes: each is a typed function over a GraphModule returning a PassResult, run by
``runner.run_pass`` (lint, recompile, the failing pass named in its error); one rewrite per file."""
