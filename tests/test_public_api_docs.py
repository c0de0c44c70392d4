"""Every public name is documented with an example, and those examples run as tests.

Public names: ``__all__`` of each module in :data:`PUBLIC_MODULES`, plus the classes and
functions those modules define under a name without a leading underscore.

- Classes and functions need a docstring with at least one ``>>>`` example, found by
  :class:`doctest.DocTestFinder` in the module that defines them: exactly what pytest's
  ``--doctest-modules`` (on in pyproject.toml, with ``src`` in ``testpaths``) collects and runs.
- Data (mode strings, tuples, ``LOSSES``, the ``Literal`` aliases) cannot carry a docstring of
  their own at run time; each must appear in a ``>>>`` example of the docstring of the module
  that assigns it.
- Public submodules (``dynloss.functional``, ...) need a module docstring with an example.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import importlib.util
import inspect
import pkgutil
import re
import sys
import textwrap
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest

import dynloss

PUBLIC_MODULES = [
    "dynloss",
    "dynloss.functional",
    "dynloss.schedules",
    "dynloss.kernels",
    "dynloss.distributed",
    "dynloss.constants",
]


def public_names(module: ModuleType) -> list[str]:
    names = set(getattr(module, "__all__", ()))
    for name, obj in vars(module).items():
        defined_here = getattr(obj, "__module__", None) == module.__name__
        if not name.startswith("_") and defined_here and (
            inspect.isclass(obj) or inspect.isroutine(inspect.unwrap(obj))
        ):
            names.add(name)
    return sorted(names)


def is_code(obj: object) -> bool:
    return inspect.isclass(obj) or inspect.isroutine(inspect.unwrap(obj))


@cache
def doctests_of(module_name: str) -> dict[str, doctest.DocTest]:
    """The doctests pytest's --doctest-modules collects from a module, by qualified name."""
    module = importlib.import_module(module_name)
    return {test.name: test for test in doctest.DocTestFinder().find(module) if test.examples}


def example_sources(docstring: str | None) -> list[str]:
    return [ex.source for ex in doctest.DocTestParser().get_examples(docstring or "")]


def assigned_names(module: ModuleType) -> set[str]:
    """Names a module's source assigns at top level (``X = ...`` or ``X: T = ...``)."""
    tree = ast.parse(Path(inspect.getfile(module)).read_text())
    names: set[str] = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


@cache
def defining_module(name: str) -> str:
    """The dynloss module whose source assigns ``name`` at top level."""
    found = [
        info.name
        for info in pkgutil.walk_packages(dynloss.__path__, "dynloss.")
        if not info.name.rsplit(".", 1)[-1].startswith("triton")  # import Triton: no need
        and name in assigned_names(importlib.import_module(info.name))
    ]
    if name in assigned_names(dynloss):
        found.append("dynloss")
    assert len(found) == 1, f"{name} is assigned in {found or 'no module'}"
    return found[0]


def missing_examples(module: ModuleType) -> list[str]:
    """The public names of ``module`` that no collected doctest example covers."""
    missing = []
    for name in public_names(module):
        if name.startswith("__") and name.endswith("__"):
            continue  # __version__: tested against the changelog below
        obj = getattr(module, name)
        if inspect.ismodule(obj):
            if not example_sources(obj.__doc__):
                missing.append(f"{name} (module docstring)")
        elif is_code(obj):
            tests = doctests_of(obj.__module__)
            if f"{obj.__module__}.{obj.__qualname__}" not in tests:
                missing.append(name)
        else:
            home = sys.modules[defining_module(name)]
            pattern = re.compile(rf"\b{re.escape(name)}\b")
            if not any(pattern.search(src) for src in example_sources(home.__doc__)):
                missing.append(f"{name} (no >>> example in the docstring of {home.__name__})")
    return missing


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_name_has_a_runnable_example(module_name):
    module = importlib.import_module(module_name)
    assert module.__doc__ and example_sources(module.__doc__), f"{module_name}: no example"
    assert missing_examples(module) == []


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_public_data_is_listed_in_all(module_name):
    """Module-level public assignments are in __all__, so the check above sees them."""
    module = importlib.import_module(module_name)
    assert hasattr(module, "__all__")
    unlisted = {n for n in assigned_names(module) if not n.startswith("_")} - set(module.__all__)
    assert unlisted == set()


def test_the_check_can_fail(tmp_path, monkeypatch):
    source = textwrap.dedent('''
        """A module.

        >>> DOCUMENTED
        1
        """

        __all__ = ["DOCUMENTED", "UNDOCUMENTED", "Documented", "no_example", "undocumented"]

        DOCUMENTED = 1
        UNDOCUMENTED = 2


        class Documented:
            """A class.

            >>> Documented().x
            3
            """

            x = 3


        def no_example():
            """Returns 4 (no example)."""
            return 4


        def undocumented():
            return 5
    ''')
    path = tmp_path / "fake_public_module.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("fake_public_module", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "fake_public_module", module)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys.modules[__name__], "defining_module", lambda name: module.__name__)
    assert missing_examples(module) == [
        "UNDOCUMENTED (no >>> example in the docstring of fake_public_module)",
        "no_example",
        "undocumented",
    ]


def test_doctests_of_src_are_collected(pytestconfig):
    """The README's test command (``python -m pytest -q -n auto ...``) runs the docstring
    examples."""
    assert pytestconfig.getoption("doctestmodules")
    assert "src" in pytestconfig.getini("testpaths")


def test_ci_runs_the_readmes_test_command():
    """``.ci/run`` runs pytest with the README's arguments and environment (CI is what the
    README promises: a change to one must reach the other)."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    (command,) = [line for line in readme.splitlines() if "-m pytest" in line]
    env, args = re.fullmatch(r".*&& (\S+=\S+) \.venv/bin/python -m pytest (.*)", command).groups()
    ci = (root / ".ci" / "run").read_text()
    assert re.findall(r"^python -m pytest (.*)$", ci, re.M) == [args]
    assert re.findall(r"^export (\S+=\S+)$", ci, re.M)[0] == env  # the one the README sets


def test_the_docs_give_the_build_time_the_build_announces():
    """The native build's start line gives its duration; the README and the two docs pages
    that mention the first build give the same range (a measured change reaches every page)."""
    root = Path(__file__).resolve().parents[1]
    build = (root / "src" / "dynloss" / "kernels" / "native" / "build.py").read_text()
    (said,) = re.findall(r"; (\d+-\d+) s\)", build)
    for page in ("README.md", "docs/index.md", "docs/kernels.md"):
        text = " ".join((root / page).read_text().split())
        ranges = re.findall(r"(\d+)[-\u2013](\d+) (?:s|seconds)\b", text)
        assert ranges == [tuple(said.split("-"))], (page, ranges)


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def test_version_matches_the_changelog():
    """``dynloss.__version__`` (which pyproject.toml reads) is the newest changelog release, or,
    while ``[Unreleased]`` lists changes, a ``.dev0`` of a later one: a build of main must not
    carry the name of the release it differs from."""
    root = Path(__file__).resolve().parents[1]
    pyproject = (root / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject
    assert 'version = { attr = "dynloss.__version__" }' in pyproject
    changelog = (root / "CHANGELOG.md").read_text()
    released = re.findall(r"^## \[(\d[^\]]*)\] - (\d{4}-\d{2}-\d{2})$", changelog, re.M)
    assert released, "no released version in CHANGELOG.md"
    newest = released[0][0]
    unreleased = changelog.split("## [Unreleased]", 1)[1].split(f"## [{newest}]", 1)[0]
    if re.search(r"^- ", unreleased, re.M):
        version = re.fullmatch(r"(\d+\.\d+\.\d+)\.dev0", dynloss.__version__)
        assert version, f"{dynloss.__version__}: [Unreleased] lists changes, so a .dev0"
        assert _release(version[1]) > _release(newest)
    else:
        assert dynloss.__version__ == newest
    assert changelog.index("## [Unreleased]") < changelog.index(f"## [{newest}]")
    if "\n[Unreleased]: " in changelog:  # link references at the bottom: one per release
        assert f"\n[{newest}]: " in changelog


def test_changelog_has_one_section_of_each_kind_per_version():
    """Keep a Changelog: within a version, each kind (Added, Changed, ...) is one section, in
    the format's order, so a reader finds every addition of a release in one place."""
    changelog = (Path(__file__).resolve().parents[1] / "CHANGELOG.md").read_text()
    kinds = ["Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"]
    for version in re.split(r"^## ", changelog, flags=re.M)[1:]:
        name = version.splitlines()[0]
        found = re.findall(r"^### (.+)$", version, re.M)
        assert set(found) <= set(kinds), (name, found)
        assert found == sorted(set(found), key=kinds.index), (name, found)


def test_the_functional_losses_keep_their_signatures_for_type_checkers(tmp_path):
    """The docstring decorator had no annotations: mypy saw every function of
    ``dynloss.functional`` as ``Any`` and accepted any call."""
    import subprocess
    import sys

    pytest.importorskip("mypy")
    snippet = tmp_path / "use.py"
    snippet.write_text(
        "import torch\n"
        "from dynloss.functional import bce_loss, dice_loss\n"
        "x = torch.zeros(1)\n"
        "dice_loss(x, x, no_such_arg=1)\n"
        "bce_loss(x, x, no_such_arg=1)\n")
    run = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", str(snippet)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.stdout.count('Unexpected keyword argument "no_such_arg"') == 2, run.stdout
