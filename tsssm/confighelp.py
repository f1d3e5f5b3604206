"""What `tsssm <command> --help` lists: the config keys a command takes, with their defaults and
the one-line meaning written beside each field of the schemas in :mod:`tsssm.config`.

The meanings are the schema's own comments (``#:`` lines above a field, or a ``# ...`` comment
on its line), read from the source, so the help and the schema cannot drift apart.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import shutil
import textwrap
import tokenize
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

#: the parts of the config each command reads (a group, a sub-tree or single keys)
COMMAND_KEYS: dict[str, list[str]] = {
    "train": ["data", "model", "task", "trainer", "tracking", "seed", "run_name"],
    "score": ["model.run_id", "model.checkpoint", "data.path", "data.channels",
              "data.time_column", "data.label_column", "data.separator", "score",
              "tracking", "run_name"],
    "compare": ["compare", "task.baselines", "data", "tracking", "run_name"],
    "run": ["run", "data", "model", "task", "trainer", "tracking", "seed"],
    "dashboard": ["tracking.uri", "tracking.experiment"],
}
#: keys no user sets by hand (the class to build, the group's own name)
HIDDEN = {"_target_", "_recursive_", "_convert_", "name", "verbose"}


@lru_cache(maxsize=1)
def field_docs() -> dict[tuple[str, str], str]:
    """{(schema class name, field name): its comment} from tsssm/config.py."""
    source = Path(__file__).with_name("config.py").read_text()
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string
    docs: dict[tuple[str, str], str] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            above, line = [], item.lineno - 1
            while comments.get(line, "").lstrip().startswith("#:"):
                above.insert(0, comments[line].lstrip()[2:].strip())
                line -= 1
            inline = comments.get(item.lineno, "")
            text = " ".join(above) or inline.lstrip("# ").strip()
            if text:
                docs[(node.name, item.target.id)] = text
    return docs


def _doc(schema: type | None, name: str) -> str:
    docs = field_docs()
    for cls in getattr(schema, "__mro__", ()):
        if (cls.__name__, name) in docs:
            return docs[(cls.__name__, name)]
    return ""


def _value(v: Any) -> str:
    if isinstance(v, (DictConfig, ListConfig)):
        v = OmegaConf.to_container(v, resolve=True, enum_to_str=True)
    if hasattr(v, "value"):  # enums
        v = v.value
    if isinstance(v, list):
        return "[" + ",".join(map(str, v)) + "]"
    return "null" if v is None else str(v)


def _leaves(cfg: DictConfig, prefix: str) -> list[tuple[str, str, str]]:
    """(key, default, meaning) of every leaf under ``prefix`` (or the leaf itself)."""
    node = OmegaConf.select(cfg, prefix, throw_on_missing=False)
    parent_key, _, leaf = prefix.rpartition(".")
    if not isinstance(node, DictConfig):
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        return [(prefix, _value(node), _doc(OmegaConf.get_type(parent), leaf))]
    schema = OmegaConf.get_type(node)
    out = []
    for key in node:
        if key in HIDDEN:
            continue
        full = f"{prefix}.{key}"
        child = node._get_node(key)
        if isinstance(child, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(child)):
            out += _leaves(cfg, full)
        else:
            value = "???" if OmegaConf.is_missing(node, key) else _value(node[key])
            out.append((full, value, _doc(schema, key)))
    return out


def command_help(cfg: DictConfig, command: str, width: int | None = None) -> list[str]:
    """The lines of the keys section of ``tsssm <command> --help``, wrapped to ``width``."""
    width = width or max(60, min(shutil.get_terminal_size((100, 20)).columns, 120))
    if command == "score":
        intro = ["the time column, channels, label column, separator and scaling come from the "
                 "trained model unless set here"]
    else:
        intro = []
    rows = [row for prefix in COMMAND_KEYS.get(command, []) for row in _leaves(cfg, prefix)]
    lines = [f"keys of `tsssm {command}` (key=default; set any as key=value):"]
    lines += ["  " + line for text in intro for line in textwrap.wrap(text, width - 2)]
    for key, value, meaning in rows:
        head = f"  {key}={value}"
        if not meaning:
            lines.append(head)
            continue
        pad = min(40, width // 2)
        body = textwrap.wrap(meaning, width=max(20, width - pad))
        if len(head) < pad - 1:
            lines.append(f"{head:<{pad}}{body.pop(0)}")
        else:  # a long key or default: its meaning goes below it
            lines.append(head)
        lines += [" " * pad + more for more in body]
    return lines
