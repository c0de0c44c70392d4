"""A Griffe extension for the API reference: reST roles in dynloss's docstrings to Markdown.

The docstrings are Google style, written to read well under ``help()``, and use a few reST
constructs that Markdown does not know. Before mkdocstrings renders them this rewrites

- ``:math:`x``` to ``$x$`` and ``.. math:: x`` (with its indented continuation lines) to a
  ``$$ x $$`` block, which pymdownx.arithmatex hands to MathJax;
- ``:class:`X```, ``:func:`~a.b.X``` and the other cross-reference roles to inline code
  (``X``): plain text, so that a reference to a private module cannot fail the strict build;
- fences a doctest that stands outside an ``Examples:`` section (a module's) as code;
- and puts a blank line above a section header (``Examples:``) where an assembled docstring
  has none, so that Griffe sees the section.

The source docstrings are not changed. Registered in ``mkdocs.yml`` under the python
handler's ``extensions``.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

import griffe

_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_XREF_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):`([^`]+)`")
_SECTION = re.compile(
    r"^[ \t]*(Args|Arguments|Parameters|Returns|Yields|Raises|Examples|Attributes|Shapes|Note|"
    r"Notes|Warning|Warnings):[ \t]*$"
)
_MATH_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<first>.*)$")


def _xref(match: re.Match[str]) -> str:
    text = match.group(1).strip()
    explicit = re.fullmatch(r"(.+?)\s*<[^>]+>", text)  # :class:`Title <target>`
    if explicit:
        text = explicit.group(1)
    elif text.startswith("~"):
        text = text[1:].rsplit(".", 1)[-1]
    return f"`{text}`"


def _math_blocks(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _MATH_DIRECTIVE.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent = match.group("indent")
        body = [match.group("first").strip()] if match.group("first").strip() else []
        i += 1
        while i < len(lines):
            line = lines[i]
            if not line.strip():
                if body:
                    break
                i += 1
                continue
            if len(line) - len(line.lstrip()) <= len(indent):
                break
            body.append(line.strip())
            i += 1
        out += ["", f"{indent}$$", *(f"{indent}{b}" for b in body), f"{indent}$$", ""]
    return "\n".join(out)


def _blank_before_sections(text: str) -> str:
    """A Google section header needs a blank line above it (some assembled docstrings lack it)."""
    out: list[str] = []
    for line in text.split("\n"):
        if _SECTION.match(line) and out and out[-1].strip():
            out.append("")
        out.append(line)
    return "\n".join(out)


def _fence_bare_doctests(text: str) -> str:
    """A doctest outside an ``Examples:`` section (at column 0) as a ``pycon`` code block."""
    out: list[str] = []
    in_block = False
    for line in text.split("\n"):
        if not in_block and line.startswith(">>> "):
            out += ["", "```pycon"]
            in_block = True
        elif in_block and not line.strip():
            out += ["```", ""]
            in_block = False
        out.append(line)
    if in_block:
        out.append("```")
    return "\n".join(out)


def _no_stray_quotes(text: str) -> str:
    """A wrapped line that starts with ``>`` (as in ``>= 0``) is text, not a block quote."""
    return re.sub(r"^([ \t]*)>(?!>>)", r"\1\\>", text, flags=re.MULTILINE)


def rst_to_markdown(text: str) -> str:
    text = _no_stray_quotes(text)
    text = _fence_bare_doctests(_blank_before_sections(_math_blocks(text)))
    text = _MATH_ROLE.sub(lambda m: f"${m.group(1).strip()}$", text)
    return _XREF_ROLE.sub(_xref, text)


def _runtime_docstring(obj: griffe.Object) -> str | None:
    """The docstring that Python sees at run time, for a class or function."""
    try:
        target: Any = importlib.import_module(obj.module.path)
        for part in obj.path[len(obj.module.path) + 1:].split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError):
        return None
    doc = vars(target).get("__doc__") if isinstance(target, type) else target.__doc__
    return inspect.cleandoc(doc) if isinstance(doc, str) else None


class RstToMarkdown(griffe.Extension):
    """Rewrite every docstring once the object tree is complete."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        # on_object does not see the root package itself.
        if pkg.docstring is not None:
            pkg.docstring.value = rst_to_markdown(pkg.docstring.value)

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if obj.is_alias or not (obj.is_class or obj.is_function or obj.is_module):
            if obj.docstring is not None:
                obj.docstring.value = rst_to_markdown(obj.docstring.value)
            return
        # Static analysis reads the source; some docstrings are assembled in code (the
        # arguments shared by a family of losses): take those from the imported object.
        if obj.docstring is None or "{shared}" in obj.docstring.value:
            runtime = _runtime_docstring(obj)
            if runtime:
                obj.docstring = griffe.Docstring(
                    runtime, parent=obj, parser=loader.docstring_parser,
                    parser_options=loader.docstring_options,
                )
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
