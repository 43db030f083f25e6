"""The config reference, generated from the dataclasses in emu_mc/config.py (pretraining) and
emu_mc/decoder/config.py (decoder training): every field's dotted name, type, default, allowed values
and its comment there (the comment lines just above the field and the one at the end of its line),
under its section's docstring.

    python -m emu_mc.pretrain --help-config          # plain text, in the terminal
    python -m emu_mc.train_decoder --help-config     # the decoder-training job's fields
    python -m emu_mc.config_docs > docs/config.md    # the committed reference (a test checks it is current)
"""
import argparse
import ast
import dataclasses
import inspect
import io
import sys
import tokenize
import typing
from typing import Any, Dict, Iterator, List, Literal, Tuple

from emu_mc.config import Config

# Sections of the decoder-training job that are pretraining's (emu_mc/decoder/config.py reuses them).
SHARED_WITH_PRETRAINING = ("optim", "train")


@dataclasses.dataclass
class FieldDoc:
    name: str  # dotted, e.g. model.llm.num_layers
    type: str
    default: str
    allowed: str  # "" when any value of the type is accepted
    doc: str


def _comments(module) -> Dict[int, str]:
    """Line number -> the text of the comment on that line, over `module`'s source."""
    source = inspect.getsource(module)
    return {tok.start[0]: tok.string.lstrip("#").strip()
            for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}


def _field_comments(cls: type) -> Dict[str, str]:
    """Field name -> its comment block (lines directly above it, then the end-of-line comment)."""
    module = sys.modules[cls.__module__]
    comments, source = _comments(module), inspect.getsource(module)
    lines, tree = source.splitlines(), ast.parse(source)
    (node,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__]
    out = {}
    for stmt in node.body:
        if not isinstance(stmt, ast.AnnAssign):
            continue
        above, line = [], stmt.lineno - 1
        while line >= 1 and lines[line - 1].strip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        trailing = [comments[stmt.end_lineno]] if stmt.end_lineno in comments and \
            not lines[stmt.end_lineno - 1].strip().startswith("#") else []
        out[stmt.target.id] = " ".join(above + trailing)
    return out


def _type_name(tp: Any) -> Tuple[str, str]:
    """(type, allowed values) as the reference shows them."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        inner, allowed = _type_name(next(a for a in args if a is not type(None)))
        return f"{inner} or null", allowed
    if origin is Literal:
        return "str", " | ".join(map(str, args))
    if origin in (list, List):
        return f"list of {_type_name(args[0])[0]}", ""
    if dataclasses.is_dataclass(tp):
        return "mapping", ""
    if tp is bool:
        return "bool", "true | false"
    return tp.__name__, ""


def _optional_section(tp: Any) -> Any:
    """Optional[Section] -> Section (an optional section, e.g. finetune, is documented as a section)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and len(args) == 2 and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        if dataclasses.is_dataclass(inner):
            return inner
    return tp


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    else:
        value = f.default_factory()
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value) if value == "" else value
    return "[]" if value == [] else str(value)


def sections(cls: type = Config, prefix: str = "",
             skip: Tuple[str, ...] = ()) -> Iterator[Tuple[str, str, List[FieldDoc]]]:
    """(section name, section docstring, its fields) for `cls` and, depth first, every nested section
    but those named in `skip`. A list of dataclasses (data.sources) is documented as its element, under
    `name.N`."""
    hints = typing.get_type_hints(cls)
    docs = _field_comments(cls)
    own: List[FieldDoc] = []
    nested = []
    for f in dataclasses.fields(cls):
        tp, name = _optional_section(hints[f.name]), f"{prefix}{f.name}"
        element = typing.get_args(tp)[0] if typing.get_origin(tp) in (list, List) else None
        if dataclasses.is_dataclass(tp):
            if name not in skip:
                nested.append((tp, name + "."))
            continue
        kind, allowed = _type_name(tp)
        own.append(FieldDoc(name, kind, _default(f), allowed, docs.get(f.name, "")))
        if element is not None and dataclasses.is_dataclass(element):
            nested.append((element, name + ".N."))
    if own:
        yield prefix.rstrip(".") or "(top level)", inspect.cleandoc(cls.__doc__ or "") if cls.__doc__ and \
            not cls.__doc__.startswith(cls.__name__ + "(") else "", own
    for tp, sub in nested:
        yield from sections(tp, sub)


def as_text(root: type = Config) -> str:
    """The reference of job config `root` for a terminal (--help-config)."""
    out = ["Every field can be set in the YAML or overridden with --dotted.name VALUE (list items by index: "
           "--data.sources.0.shards PATH)."]
    for section, doc, fields in sections(root):
        out += ["", f"[{section}]"] + ([f"  {line}" for line in doc.splitlines()] if doc else [])
        for f in fields:
            allowed = f" ({f.allowed})" if f.allowed else ""
            out.append(f"  {f.name}: {f.type} = {f.default}{allowed}")
            if f.doc:
                out.append(f"      {f.doc}")
    return "\n".join(out) + "\n"


def _cell(text: str) -> str:
    """Text safe in a markdown table cell (no column breaks, no HTML tags such as <image>)."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


class HelpConfigAction(argparse.Action):
    """`--help-config`: print the reference (as_text) and exit, like --help (no other flag needed).
    `const`: the job config class (default: pretraining's Config)."""

    def __init__(self, option_strings, dest, const=Config, **kwargs):
        super().__init__(option_strings, dest, nargs=0, const=const, default=argparse.SUPPRESS,
                         help="list every config field (type, default, allowed values, description) and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        sys.stdout.write(as_text(self.const))
        parser.exit()


def as_markdown() -> str:
    """docs/config.md."""
    out = ["# Config reference", "",
           "Generated from the dataclasses in `emu_mc/config.py` by `python -m emu_mc.config_docs > docs/config.md`;",
           "a test fails when this file is out of date. Every field can be set in the YAML job config or",
           "overridden on the command line with `--dotted.name VALUE` (or `--dotted.name=VALUE`); list items",
           "by index, e.g. `--data.sources.0.shards PATH` (index = length appends an item).",
           "`python -m emu_mc.pretrain --help-config` prints the same in the terminal.",
           "Relative paths (shards, tokenizer, init_from, out_dir) resolve against the working directory of",
           "the run, not against the config file."]
    out += _markdown_sections(sections())
    from emu_mc.decoder.config import DecoderJobConfig

    shared = ", ".join(f"`{name}`" for name in SHARED_WITH_PRETRAINING)
    out += ["", "# Decoder training", "",
            "The job config of `python -m emu_mc.train_decoder` (`emu_mc/decoder/config.py`,",
            "`configs/decoder_*.yaml`; `python -m emu_mc.train_decoder --help-config`). Its sections",
            f"{shared} are pretraining's, documented above."]
    out += _markdown_sections(sections(DecoderJobConfig, skip=SHARED_WITH_PRETRAINING))
    return "\n".join(out) + "\n"


def _markdown_sections(docs: Iterator[Tuple[str, str, List[FieldDoc]]]) -> List[str]:
    out = []
    for section, doc, fields in docs:
        out += ["", f"## `{section}`", ""]
        if doc:
            out += [" ".join(doc.split()), ""]
        out += ["| field | type | default | allowed | description |", "|---|---|---|---|---|"]
        for f in fields:
            cells = [f"`{f.name}`", f.type, f"`{f.default}`", _cell(f.allowed), _cell(f.doc)]
            out.append("| " + " | ".join(cells) + " |")
    return out


if __name__ == "__main__":
    sys.stdout.write(as_markdown())
