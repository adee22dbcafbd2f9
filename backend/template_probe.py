"""Prove that a chat template never looks at message content: it only writes it, verbatim or stripped.

`render` learns, once per role pattern, where each message's content lands in the rendered text (the
"structure" in `backend.chat`). For a template that never branches on content, every conversation with that
role pattern renders as the same fixed text with each content substituted, so the per-row Jinja render (the
largest cost of `render`) can be skipped. This module decides whether a template is such a template, by
rendering the role pattern once with *instrumented* content strings:

- `_Content` (a message's content) and `_Derived` (a string concatenated from content) are ``str`` subclasses
  whose every method and operator records that the template inspected content (compared it, searched it, took
  its length, sliced it, iterated it, hashed it, formatted it, ...). Allowed without a record: concatenation
  (``+``, ``~``: the result is a `_Derived`), truthiness (always true: normalized content is a non-empty
  string), type tests (``is string``, ``is defined``, ...), and ``strip()``/``| trim`` on a content itself.
- The template is recompiled from its own syntax tree with every ``{{ output }}``, ``~`` concatenation and
  ``in`` test routed through small helpers, and with every filter, test and call wrapped: a filter other than
  ``trim`` (or a structural one such as ``length`` on a list) that receives content, a call that receives it,
  content written inside a captured block (``{% set x %}``, a macro, ``{% filter %}``) all record.
- Each content written to the output is recorded with whether it was stripped.

The template is *content-independent* for the pattern when nothing was recorded, the instrumented text equals
the plain rendering, and every content was written exactly once. Because every path by which a Jinja template
can read a string goes through one of those hooks, the control flow and the output of such a template depend
on the roles only; the per-row render is then skipped (with periodic verification in `backend.chat`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping

_lock = threading.Lock()
_state: dict = {"events": [], "written": [], "impure": set()}

# methods of str that a template may use on content without the rendering depending on the content
_NOT_HOOKED = {
    "__new__",
    "__init__",
    "__init_subclass__",
    "__subclasshook__",
    "__class__",
    "__getattribute__",
    "__setattr__",
    "__delattr__",
    "__reduce__",
    "__reduce_ex__",
    "__getnewargs__",
    "__dir__",
    "__sizeof__",
    "__doc__",
    "__getstate__",
    "__add__",
    "__bool__",
}
# tests whose answer is the same for every non-empty string (not `is filter` / `is test`: they look the string
# up as a name)
_CONSTANT_TESTS = {
    "string",
    "defined",
    "undefined",
    "none",
    "iterable",
    "sequence",
    "mapping",
    "number",
    "integer",
    "float",
    "boolean",
    "true",
    "false",
    "callable",
}
# filters that, given a list/dict holding content, read that content only through hooked operations (tests
# from the wrapped test table, comparisons, truthiness, attribute lookups) or merely hand it on
_STRUCTURAL_FILTERS = {
    "length",
    "count",
    "first",
    "last",
    "list",
    "reverse",
    "batch",
    "slice",
    "map",
    "items",
    "default",
    "d",
    "select",
    "reject",
    "selectattr",
    "rejectattr",
    "sort",
    "unique",
    "min",
    "max",
    "groupby",
    "dictsort",
    "attr",
}


def _record(what: str) -> None:
    _state["events"].append(what)


def _parts(x) -> list:
    if isinstance(x, _Content):
        return [(x.index, x.stripped)]
    if isinstance(x, _Derived):
        return x.parts
    return []


class _Tracked(str):
    """What both probe strings allow freely: truthiness (always true) and concatenation (gives a `_Derived`)."""

    def __bool__(self):
        return True

    def __add__(self, other):
        return _Derived.of(self, other)

    def __radd__(self, other):
        return _Derived.of(other, self)


class _Content(_Tracked):
    """A message's content in the probe render."""

    index: int
    stripped: bool

    def strip(self, chars=None):
        if chars is not None:
            _record("strip(chars)")
        out = _Content(str.strip(self, chars))
        out.index, out.stripped = self.index, True
        return out


class _Derived(_Tracked):
    """A string built by concatenating content with other strings."""

    parts: list

    @staticmethod
    def of(*items) -> _Derived:
        out = _Derived("".join(str.__str__(i) if isinstance(i, str) else _plain(i) for i in items))
        out.parts = [p for i in items for p in _parts(i)]
        return out


def _hook(cls, name):
    base = getattr(str, name)

    def method(self, *args, **kwargs):
        _record(f"str.{name}")
        return base(self, *args, **kwargs)

    method.__name__ = name
    setattr(cls, name, method)


for _cls in (_Content, _Derived):
    for _name in dir(str):
        if _name in _NOT_HOOKED or (_cls is _Content and _name == "strip") or not callable(getattr(str, _name)):
            continue
        _hook(_cls, _name)


def _plain(x) -> str:
    """str() of a value that is not content (a container holding content reprs it: hooked)."""
    return str(x)


def _has_content(x, depth: int = 0) -> bool:
    if isinstance(x, _Tracked):
        return True
    if depth > 6 or isinstance(x, str):
        return False
    if isinstance(x, Mapping):
        return any(_has_content(v, depth + 1) or _has_content(k, depth + 1) for k, v in x.items())
    if isinstance(x, (list, tuple, set, frozenset)):
        return any(_has_content(v, depth + 1) for v in x)
    ns = getattr(x, "_Namespace__attrs", None)  # jinja2 namespace()
    if isinstance(ns, dict):
        return _has_content(ns, depth + 1)
    return False


def _materialize(args):
    # a generator (e.g. from `map`) cannot be looked into without consuming it: hand on a list instead
    return [list(a) if isinstance(a, Iterator) and not isinstance(a, str) else a for a in args]


# --------------------------------------------------------------------------------- helpers the AST calls
def _out(x):
    """`{{ x }}` at the top level: content is written (recorded), anything else as Jinja would."""
    if isinstance(x, _Tracked):
        _state["written"].extend(_parts(x))
        return str.__str__(x)
    return x


def _out_captured(x):
    """`{{ x }}` inside a captured block: its text could be inspected later, unhooked."""
    if _has_content(x):
        _record("content written inside a captured block (set block, macro, filter block, call block)")
    return x


def _concat(*items):
    """`a ~ b ~ c`."""
    if any(isinstance(i, _Tracked) for i in items):
        return _Derived.of(*items)
    return "".join(_plain(i) for i in items)


class _In:
    """The right side of an `in` test: `content in 'some text'` would read content without any hook."""

    __slots__ = ("container",)

    def __init__(self, container):
        self.container = container

    def __contains__(self, item):
        if isinstance(item, _Tracked) and not isinstance(self.container, _Tracked):
            _record("content tested with `in`")
        return item in self.container


_NO_OWNER = object()
_HELPERS = {"__sft_out": _out, "__sft_out_captured": _out_captured, "__sft_concat": _concat, "__sft_in": _In}


def _instrument(source: str, env):
    """The template recompiled with the hooks (a separate environment: the real one is untouched)."""
    from jinja2 import nodes
    from jinja2.runtime import LoopContext, Macro
    from jinja2.utils import Cycler, Joiner, Namespace

    def call(name, args, lineno):
        return nodes.Call(nodes.Name(name, "load"), args, [], None, None).set_lineno(lineno)

    captured_kinds = (nodes.AssignBlock, nodes.Macro, nodes.CallBlock, nodes.FilterBlock)

    def rewrite(node, captured):
        if isinstance(node, nodes.Output):
            node.nodes = [
                n
                if isinstance(n, nodes.TemplateData)
                else call("__sft_out_captured" if captured else "__sft_out", [rewrite(n, captured)], n.lineno)
                for n in node.nodes
            ]
            return node
        if isinstance(node, nodes.Concat):
            return call("__sft_concat", [rewrite(n, captured) for n in node.nodes], node.lineno)
        inner = captured or isinstance(node, captured_kinds)
        for name, value in node.iter_fields():
            if isinstance(value, list):
                setattr(node, name, [rewrite(v, inner) if isinstance(v, nodes.Node) else v for v in value])
            elif isinstance(value, nodes.Node):
                setattr(node, name, rewrite(value, inner))
        if isinstance(node, nodes.Compare):
            for op in node.ops:
                if op.op in ("in", "notin"):
                    op.expr = call("__sft_in", [op.expr], node.lineno)
        return node

    probe_env = env.overlay()
    probe_env.filters = {name: _wrap_filter(name, f) for name, f in env.filters.items()}
    probe_env.tests = {name: _wrap_test(name, f) for name, f in env.tests.items()}
    probe_env.globals = dict(env.globals)
    probe_env.globals.update(_HELPERS)
    trusted = list(_HELPERS.values()) + [env.globals.get("namespace")]  # namespace(x=content) only stores it
    # callables whose result depends on their arguments only; any other (strftime_now, lipsum, a function the
    # caller passed in) may return something else for the next row: recorded as an impure call
    pure = trusted + [env.globals.get(n) for n in ("range", "dict", "cycler", "joiner", "raise_exception")]
    pure_owners = (str, list, dict, tuple, int, float, bool, type(None), LoopContext, Cycler, Joiner, Namespace)
    real_call = env.call

    def checked_call(context, obj, *args, **kwargs):
        owner = getattr(obj, "__self__", _NO_OWNER)  # the object a bound method belongs to
        # a content's own methods hook themselves; any other callable handed content could read it unhooked
        if (
            not any(obj is t for t in trusted)
            and not isinstance(owner, _Tracked)
            and (_has_content(args) or _has_content(kwargs))
        ):
            _record(f"content passed to {getattr(obj, '__name__', type(obj).__name__)}()")
        if not (any(obj is t for t in pure) or isinstance(obj, Macro) or isinstance(owner, pure_owners)):
            _state["impure"].add(getattr(obj, "__name__", type(obj).__name__))
        return real_call(context, obj, *args, **kwargs)

    probe_env.call = checked_call
    tree = rewrite(env.parse(source), False)
    return probe_env.from_string(tree)


def _pass_arg_count(f) -> int:
    return 1 if getattr(f, "jinja_pass_arg", None) is not None else 0


def _wrap_filter(name, f):
    skip = _pass_arg_count(f)

    def wrapper(*args, **kwargs):
        args = list(args[:skip]) + _materialize(args[skip:])
        value, rest = (args[skip] if len(args) > skip else None), args[skip + 1 :]
        if name == "trim" and isinstance(value, _Content) and not rest and not kwargs:
            return value.strip()
        direct = isinstance(value, _Tracked)
        if (
            (direct and name not in ("default", "d"))
            or _has_content(rest)
            or _has_content(kwargs)
            or (not direct and name not in _STRUCTURAL_FILTERS and _has_content(value))
        ):
            _record(f"content through filter {name!r}")
        return f(*args, **kwargs)

    if skip:
        wrapper.jinja_pass_arg = f.jinja_pass_arg
    return wrapper


def _wrap_test(name, f):
    skip = _pass_arg_count(f)

    def wrapper(*args, **kwargs):
        value, rest = (args[skip] if len(args) > skip else None), args[skip + 1 :]
        if (name not in _CONSTANT_TESTS and _has_content(value)) or _has_content(rest) or _has_content(kwargs):
            _record(f"content through test {name!r}")
        return f(*args, **kwargs)

    if skip:
        wrapper.jinja_pass_arg = f.jinja_pass_arg
    return wrapper


_instrumented: dict = {}


def content_independent(
    source: str, env, messages: list[dict], expected_text: str, **kwargs
) -> tuple[dict[int, bool] | None, set[str], str]:
    """Whether rendering ``messages`` (normalized, plain strings) with the template ``source`` depends on the
    contents only by writing each of them once, verbatim or stripped.

    Returns ``(stripped, impure, reason)``: ``stripped`` maps each message index to whether its content was
    written stripped, or is None when independence is not proven (``reason`` says why); ``impure`` names the
    called functions whose results may change from one call to the next (``strftime_now``: the date).
    ``expected_text`` is the template's plain rendering of the same messages (the instrumented one must equal
    it); ``kwargs`` are the template variables (special tokens, ...)."""
    impure: set[str] = set()
    try:
        key = (source, id(env))
        probe = _instrumented.get(key)
        if probe is None:
            if len(_instrumented) > 16:
                _instrumented.clear()
            probe = _instrumented[key] = _instrument(source, env)
        contents = []
        for i, m in enumerate(messages):
            c = _Content(m["content"])
            c.index, c.stripped = i, False
            contents.append(c)
        probe_messages = [{"role": m["role"], "content": c} for m, c in zip(messages, contents, strict=False)]
        with _lock:
            _state.update(events=[], written=[], impure=set())
            try:
                text = probe.render(
                    messages=probe_messages, tools=None, documents=None, add_generation_prompt=False, **kwargs
                )
            finally:
                events, written, impure = _state["events"], _state["written"], _state["impure"]
                _state.update(events=[], written=[], impure=set())
    except Exception as e:  # any failure means: not proven
        return None, impure, f"instrumented render failed: {type(e).__name__}: {e}"
    if events:
        return None, impure, f"the template inspects message content ({events[0]})"
    if text != expected_text:
        return None, impure, "the instrumented rendering differs from the plain one"
    if sorted(i for i, _ in written) != list(range(len(messages))):
        return None, impure, "not every message content is written exactly once"
    return dict(written), impure, ""
