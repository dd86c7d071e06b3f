"""The injected (or merged) model, called like the model it came from.

``inject`` returns a ``LoraModel``: a ``PortableGraphModule`` (every API that takes the graph
keeps working; ``.to()`` follows) whose ``forward`` has the original model's signature. A call
is bound to that signature (``model.binding``) and runs the captured graph when it fits it; a
call with other kinds of arguments (``labels=``, ``token_type_ids=``, a fixed axis of another
size, ...) runs a graph captured again for those arguments, once, from the eager model over
this module's own tensors (the capture's weightless skeleton, ``capture.recapture``), with the
same LoRA branches (the same tensors: training either trains both); tensors the forward takes
through ``**kwargs`` (Trainer's ``num_items_in_batch``) are inputs of that graph. Outputs are
the model's own (a ``ModelOutput`` with ``.loss`` when the model computes one).

A call no graph can serve, because it passes or asks for a KV cache (``use_cache=True``, a
``Cache`` object: ``binding.stateful``), runs ``hooked_model()``: the eager model over this
module's tensors with each branch a forward hook on the module it wraps (``eager_lora``).
``generate()`` is that model's ``generate``, with its cache; where a branch has no such module
(a functional site) its forward is routed through this model instead, without a cache (every
step recomputes the prefix through the graph), and cache calls are refused in one line. ``config``,
``generation_config``, ``main_input_name`` and ``loss_type`` are the model's (its skeleton's);
``device`` is where the parameters are.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import inspect
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ..capture.recapture import SOURCE_KEY, Source, eager_model
from ..capture.trace import CAPTURE_KEY, capture
from ..errors import LoraFxError
from ..graph.attrs import resolve_attr
from ..graph.portable import PortableGraphModule, graph_module
from ..graph.state import BRANCH_ROOT, STATE_KEY, LoraState, get_state
from ..passes.inject import inject_pass
from ..passes.runner import run_pass
from ..passes.variant_hooks import variant_hooks_pass
from .binding import Call, Pattern, TensorSlot, bind, defaults, fits, pattern, stateful
from .eager_lora import attach, plan_hooks
from .plan import plan
from .saving import save_adapter
from .tied import realias, unalias

CALL_KEY = "lorafx_call"  # gm.meta[CALL_KEY]: Origin


@dataclasses.dataclass
class Origin:
    """How a LoraModel is called: the original forward's signature, the capture's pattern.

    The model itself is not kept: the capture keeps its weightless skeleton
    (``capture.recapture``), and ``eager_model`` rebuilds it over this module's own tensors
    (merged, cast, trained) whenever a call needs it again.
    """

    signature: inspect.Signature
    pattern: Pattern
    arity: int          # positional arguments the captured graph takes
    name: str           # the model's class name, for messages


@dataclasses.dataclass
class CallGraph:
    """A graph captured again for calls of another pattern (``capture_for_call``)."""

    pattern: Pattern
    module: fx.GraphModule
    arity: int
    tensors: tuple[str, ...] = ()  # ``**kwargs`` tensors it takes after the positional ones

    def __call__(self, call: Call) -> Any:
        return self.module(*call.values[: self.arity], *(call.extras[n] for n in self.tensors))


def _dispatching_forward() -> Callable[..., Any]:
    """A fresh ``forward`` for one LoraModel's class (fx gives each instance its own)."""

    def forward(self: LoraModel, *args: Any, **kwargs: Any) -> Any:
        return self.dispatch(args, kwargs)

    forward.lorafx_dispatch = True  # type: ignore[attr-defined]
    return forward


def sign(model: fx.GraphModule) -> None:
    """Give ``model.forward`` the original model's signature (what ``inspect`` and
    ``transformers`` read: label names, the dataset columns to keep)."""
    origin = model.__dict__.get("meta", {}).get(CALL_KEY)  # no meta while fx builds it
    if isinstance(origin, Origin):
        first = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        type(model).forward.__signature__ = origin.signature.replace(  # type: ignore
            parameters=[first, *origin.signature.parameters.values()])


class LoraModel(PortableGraphModule):
    """A GraphModule called like the model it was captured from (see the module docstring).

    ``graph_forward`` is the graph's own code (positional, as captured); ``forward`` binds
    keyword arguments as the original ``forward`` takes them.
    """

    graph_forward: Callable[..., Any]  # the graph's generated code, set by recompile

    def recompile(self) -> Any:
        self.__dict__.pop("_lorafx_call_graphs", None)  # captured for the graph before this one
        self.__dict__.pop("_lorafx_eager", None)
        code = super().recompile()
        cls = type(self)
        forward = cls.__dict__.get("forward")
        if forward is not None and not getattr(forward, "lorafx_dispatch", False):
            cls.graph_forward = forward  # type: ignore[attr-defined]
            cls.forward = _dispatching_forward()  # type: ignore[method-assign]
            sign(self)
        return code

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        new = super().__deepcopy__(memo)
        sign(new)
        return new

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """The module's state dict with each tied tensor once (``model.tied``)."""
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        return unalias(super().state_dict(*args, **kwargs), prefix)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False
                        ) -> Any:
        return super().load_state_dict(realias(self, state_dict), strict=strict, assign=assign)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        self.__dict__.pop("_lorafx_call_graphs", None)  # captured for other devices or dtypes
        self.__dict__.pop("_lorafx_eager", None)
        return super()._apply(fn, recurse)  # baked devices and dtypes follow (graph.portable)

    # --- calling ---------------------------------------------------------------------------

    def dispatch(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run the graph that fits ``args``/``kwargs`` (capturing one the first time)."""
        origin = self.meta.get(CALL_KEY)
        if not isinstance(origin, Origin) or self.meta.get(CAPTURE_KEY) != "export" or \
                torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return self.graph_forward(*args, **kwargs)
        call = bind(origin.signature, args, kwargs, origin.name)
        if fits(origin.pattern, call):
            return self.graph_forward(*call.values[: origin.arity])
        state = stateful(call)
        if state is not None:
            return self.hooked_model(f"a call with {state}=")(*args, **kwargs)
        graphs: list[CallGraph] = self.__dict__.setdefault("_lorafx_call_graphs", [])
        found = next((g for g in graphs if fits(g.pattern, call)), None)
        if found is None:
            found = capture_for_call(self, origin, call)
            graphs.append(found)
        found.module.train(self.training)
        return found(call)

    # --- what PEFT users reach for on the model --------------------------------------------

    def origin_model(self, what: str = "this") -> nn.Module:
        """The eager model over this module's tensors (a fresh view: ``eager_model``)."""
        model = eager_model(self)
        if model is None:
            raise LoraFxError(f"{what} needs the eager model, which this graph does not keep "
                              "(it was captured by symbolic_trace or from a graph): call it as "
                              "captured")
        return model

    @property
    def config(self) -> Any:
        return _origin_attr(self, "config")

    @property
    def generation_config(self) -> Any:
        return _origin_attr(self, "generation_config")

    @property
    def main_input_name(self) -> Any:
        return _origin_attr(self, "main_input_name")

    @property
    def loss_type(self) -> Any:  # Trainer: whether labels are shifted (num_items_in_batch)
        return _origin_attr(self, "loss_type")

    @property
    def device(self) -> torch.device:
        first = next(iter(self.parameters()), None)
        return first.device if first is not None else torch.device("cpu")

    def can_generate(self) -> bool:
        source = self.meta.get(SOURCE_KEY)
        return isinstance(source, Source) and callable(getattr(source.skeleton, "generate", None))

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The original model's ``generate`` (on a view of it over this module's tensors)
        computing this model's function.

        With its KV cache where every branch hooks onto the module it wraps
        (``eager_lora.plan_hooks``); otherwise each forward runs through this model's graph
        without a cache (each step runs the whole sequence).
        """
        hooked = self._hooked("generate()")
        model = hooked if hooked is not None else self.origin_model("generate()")
        generate = getattr(model, "generate", None)
        if not callable(generate):
            raise LoraFxError(f"{type(model).__name__} has no generate(): only causal and "
                              "seq2seq language models generate")
        if hooked is not None:
            return generate(*args, **kwargs)
        kwargs["use_cache"] = False
        with routed(model, self):
            return generate(*args, **kwargs)

    def hooked_model(self, what: str) -> nn.Module:
        """The eager model over this module's tensors with every branch a forward hook on
        the module it wraps (``eager_lora``): this module's function, with what the eager
        model has and a graph does not (a KV cache in and out); refused in one line where a
        site has no module."""
        hooked = self._hooked(what)
        if hooked is None:
            raise LoraFxError(f"{what} runs the eager model with each LoRA branch hooked "
                              "onto the module it wraps, and a site of this model is not "
                              "a module's call (a functional projection): call it "
                              "without a cache (use_cache=False)")
        return hooked

    def _hooked(self, what: str) -> nn.Module | None:
        """``hooked_model``, None where a site has no module; built once and kept while this
        module holds the same tensor objects (a copy or a merge holds others)."""
        tensors = tuple(id(t) for _, t in (*self.named_parameters(remove_duplicate=False),
                                           *self.named_buffers(remove_duplicate=False)))
        cached = self.__dict__.get("_lorafx_eager")
        if cached is None or cached[0] != tensors:
            model = self.origin_model(what)
            hooks = plan_hooks(self, model)
            cached = (tensors, attach(model, hooks) if hooks is not None else None)
            self.__dict__["_lorafx_eager"] = cached
        if cached[1] is not None:
            cached[1].train(self.training)
        return cached[1]

    def save_pretrained(self, directory: str | Path, **_: Any) -> Path:
        """Write the adapter in PEFT's layout (``PeftModel.save_pretrained``'s habit)."""
        return save_adapter(self, directory, force=True)


def _origin_attr(model: LoraModel, name: str) -> Any:
    """An attribute of the captured model (its skeleton: no weights are read)."""
    source = model.meta.get(SOURCE_KEY)
    if not isinstance(source, Source) or not hasattr(source.skeleton, name):
        raise AttributeError(f"{type(model).__name__} has no attribute {name!r}")
    return getattr(source.skeleton, name)


@contextlib.contextmanager
def routed(model: nn.Module, through: nn.Module) -> Iterator[None]:
    """``model.forward`` runs ``through`` inside the block (its signature unchanged)."""
    had = "forward" in model.__dict__
    old = model.__dict__.get("forward")
    cached = bool(getattr(getattr(model, "config", None), "use_cache", False))

    @functools.wraps(model.forward)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("use_cache") is False and not cached:
            kwargs.pop("use_cache")  # the graph was captured without a cache already
        if kwargs.get("return_dict") is True:
            kwargs.pop("return_dict")  # it returns the model's output object already
        return through(*args, **kwargs)

    model.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        if had:
            model.forward = old  # type: ignore[method-assign,assignment]
        else:
            del model.forward


# --- wrapping and capturing again -------------------------------------------------------------

def as_model(gm: fx.GraphModule, model: nn.Module, example_inputs: tuple[Any, ...]
             ) -> LoraModel:
    """``gm`` (captured from ``model`` on ``example_inputs``) as a LoraModel sharing all of
    its submodules, parameters and meta."""
    new = LoraModel(gm, gm.graph)
    new.meta = dict(gm.meta)
    signature = inspect.signature(model.forward)
    call = bind(signature, tuple(example_inputs), {}, type(model).__name__)
    new.meta[CALL_KEY] = Origin(signature, pattern(call, gm.graph), len(tuple(example_inputs)),
                                type(model).__name__)
    sign(new)
    new.train(gm.training)
    return new


def like(gm: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule over ``gm``'s attributes and ``graph``, a LoraModel if ``gm`` is one
    (carrying its origin)."""
    if not isinstance(gm, LoraModel):
        return graph_module(gm, graph)
    new = LoraModel(gm, graph)
    new.meta[CALL_KEY] = gm.meta.get(CALL_KEY)
    sign(new)
    return new


def capture_for_call(model: LoraModel, origin: Origin, call: Call) -> CallGraph:
    """Capture the eager model (over ``model``'s tensors) again for ``call``'s arguments, with
    ``model``'s branches."""
    where = origin.name
    unknown = [k for k, v in call.extras.items()
               if isinstance(v, torch.Tensor) and not _declared(origin.signature, k)]
    if unknown:
        named = [n for n in call.names if n not in ("self",)]
        close = difflib.get_close_matches(unknown[0], named, 3, 0.3) or named[:3]
        raise LoraFxError(f"{where}: keyword argument {unknown[0]!r} is a tensor that forward "
                          f"does not name (its **kwargs would drop it): did you mean "
                          f"{' or '.join(close)}?")
    source = model.origin_model("calling it with other arguments than its capture's")
    state = get_state(model)
    local = _capture_local(model, source)
    if state is None and local:
        raise LoraFxError(f"{where}: the merged model holds weights of its own ({local[0]}, an "
                          "untied copy), so it runs only calls like its capture's "
                          f"({_takes(origin.pattern)}): call it that way, or merge again")
    args = call.leading(defaults(origin.signature))
    tensors = tuple(k for k, v in call.extras.items() if isinstance(v, torch.Tensor))
    twin = _with_extras(source, dict(call.extras), len(args), tensors)
    inputs = (*args, *(call.extras[n] for n in tensors))
    gm = capture(twin, inputs) if state is None else _reinject(twin, inputs, state, where)
    alt = _reroot(gm, model, source)
    return CallGraph(pattern(call, gm.graph), alt, len(args), tensors)


def _declared(signature: inspect.Signature, name: str) -> bool:
    """Whether ``forward`` reads ``name``: a keyword-only parameter, or a key of the TypedDict
    its ``**kwargs: Unpack[...]`` declares (HF's TransformersKwargs: ``num_items_in_batch``,
    ...); any name where ``**kwargs`` is untyped."""
    param = signature.parameters.get(name)
    if param is not None:
        return True
    var = next((p for p in signature.parameters.values()
                if p.kind == inspect.Parameter.VAR_KEYWORD), None)
    if var is None:
        return False
    args = typing.get_args(var.annotation) if typing.get_origin(var.annotation) is \
        typing.Unpack else ()
    if not args or not typing.is_typeddict(args[0]):
        return True
    return name in args[0].__required_keys__ | args[0].__optional_keys__


def _takes(want: Pattern) -> str:
    """The names of the arguments a capture took values for (tensors, or not None)."""
    return ", ".join(n for n, (_, slots) in want.items()
                     if any(isinstance(x, TensorSlot) for x in slots)) or "no tensors"


def _with_extras(model: nn.Module, extras: dict[str, Any], arity: int,
                 tensors: tuple[str, ...]) -> nn.Module:
    """``model`` (its submodules and tensors shared) whose forward takes ``arity`` positional
    arguments, then the ``**kwargs`` tensors named ``tensors`` positionally (the graph's
    inputs: Trainer's ``num_items_in_batch``), and every other extra fixed."""
    if not extras:
        return model
    fixed = {k: v for k, v in extras.items() if k not in tensors}

    def forward(*args: Any) -> Any:
        return model.forward(*args[:arity], **fixed, **dict(zip(tensors, args[arity:],
                                                                strict=True)))

    names = [*inspect.signature(model.forward).parameters][:arity] + list(tensors)
    forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_ONLY) for n in names])
    twin = nn.Module.__new__(type(model))
    twin.__dict__ = dict(model.__dict__)
    twin.forward = forward  # type: ignore[method-assign]
    return twin


def _reinject(model: nn.Module, args: tuple[Any, ...], state: LoraState, where: str
              ) -> fx.GraphModule:
    """Capture ``model`` and add branches at ``state``'s sites (their weights set later)."""
    config = dataclasses.replace(state.config, init_lora_weights=False)
    gm, chosen, _ = plan(model, args, config)
    new = LoraState(state.config)
    gm.meta[STATE_KEY] = new
    run_pass("inject", inject_pass, gm, chosen, config, new)
    if set(new.sites) != set(state.sites):
        odd = sorted(set(new.sites) ^ set(state.sites))[0]
        raise LoraFxError(f"{where}: capturing the model for this call found other sites "
                          f"(site {odd!r}): call it with the arguments it was injected with")
    run_pass("variant_hooks", variant_hooks_pass, gm)  # DoRA: wire W and b into each branch
    new.saved = list(state.saved)
    return gm


def _has(module: nn.Module, target: str) -> bool:
    try:
        resolve_attr(module, target)  # type: ignore[arg-type]
    except AttributeError:
        return False
    return True


def _capture_local(model: fx.GraphModule, source: nn.Module) -> list[str]:
    """Parameters ``model`` reads that the source model does not hold by that name (a merge's
    untied weight copies)."""
    return [str(n.target) for n in model.graph.nodes if n.op == "get_attr"
            and isinstance(resolve_attr(model, str(n.target)), nn.Parameter)
            and not _has(source, str(n.target))]


def _reroot(gm: fx.GraphModule, model: nn.Module, source: nn.Module) -> fx.GraphModule:
    """``gm``'s graph over ``model``'s tensors and branches wherever the source model has the
    same path (site weights, PiSSA residuals, modules_to_save copies, merged weights), the
    capture's own constants and modules elsewhere."""
    root: dict[str, Any] = {}
    for node in gm.graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        target = str(node.target)
        mine = target.startswith(BRANCH_ROOT + ".") or _has(source, target)
        root[target] = resolve_attr(model if mine and _has(model, target) else gm,  # type: ignore
                                    target)
    new = fx.GraphModule(root, gm.graph)
    new.meta[CAPTURE_KEY] = gm.meta.get(CAPTURE_KEY)
    return new
