"""Every Python snippet of the README and the documentation runs, as a user who copies it into
a training script would run it.

A page's ``python`` blocks run in order in one namespace (a later block may use what an earlier
one built), which starts with what a training script has before it builds its loss: ``torch``,
a small ``model``, its ``optimizer`` and LR ``scheduler``, a ``loader`` and the validation
functions the snippets call (``evaluate``, ``validation_dice``, ``train_one_epoch``). A
``pycon`` block (``>>>`` prompts) is a doctest in the same namespace: the output and the
error it shows are checked too.
"""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```(python|pycon)\n(.*?)^```$", re.M | re.S)


def training_script_context() -> dict[str, object]:
    """The names a snippet takes from the user's script: a one-layer model over (2, 1, 16, 16)
    images, its Adam optimizer, a ReduceLROnPlateau scheduler and a loader of two batches."""
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Conv2d(1, 1, 3, padding=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = [(torch.randn(2, 1, 16, 16, generator=generator),
               torch.rand(2, 1, 16, 16, generator=generator) > 0.7) for _ in range(2)]

    def evaluate(net: torch.nn.Module) -> float:
        with torch.no_grad():
            return sum(torch.nn.functional.binary_cross_entropy_with_logits(
                net(images), masks.float()).item() for images, masks in loader) / len(loader)

    def validation_dice(net: torch.nn.Module) -> float:
        with torch.no_grad():
            hits = [((net(images) > 0) & masks).sum() * 2 / ((net(images) > 0).sum()
                                                               + masks.sum())
                    for images, masks in loader]
        return float(sum(hits) / len(hits))

    def train_one_epoch(net: torch.nn.Module, loss_fn: torch.nn.Module) -> None:
        for images, masks in loader:
            optimizer.zero_grad()
            loss_fn(net(images), masks).backward()
            optimizer.step()

    return {"torch": torch, "model": model, "optimizer": optimizer, "loader": loader,
            "scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer),
            "evaluate": evaluate, "validation_dice": validation_dice,
            "train_one_epoch": train_one_epoch}


def run_page(text: str, name: str) -> int:
    """Runs every snippet of a page's ``text`` in order; returns how many ran. A failing
    ``python`` block raises its error naming the block; a failing ``pycon`` one an
    AssertionError with doctest's report."""
    namespace = training_script_context()
    blocks = BLOCK.findall(text)
    for number, (kind, code) in enumerate(blocks):
        where = f"{name}, snippet {number} ({kind})"
        if kind == "python":
            try:
                exec(compile(code, where, "exec"), namespace)  # the docs' code, as a user runs it
            except Exception as error:
                raise AssertionError(f"{where} raised {type(error).__name__}: {error}"
                                     ) from error
        else:
            test = doctest.DocTestParser().get_doctest(code, namespace, where, name, 0)
            report: list[str] = []
            runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS
                                           | doctest.NORMALIZE_WHITESPACE)
            runner.run(test, out=report.append, clear_globs=False)
            namespace.update(test.globs)  # (a doctest runs in a copy of the namespace)
            if runner.failures:
                raise AssertionError(f"{where}:\n" + "".join(report))
    return len(blocks)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_snippet_of_the_page_runs(page):
    run_page(page.read_text(), str(page.relative_to(ROOT)))


def test_the_snippets_are_found():
    """The README and the pages that teach the API hold snippets, and all are found (a
    change of the fence syntax would otherwise leave nothing to run)."""
    counts = {str(p.relative_to(ROOT)): len(BLOCK.findall(p.read_text())) for p in PAGES}
    assert counts["README.md"] >= 2
    assert counts["docs/index.md"] >= 3
    assert counts["docs/schedules.md"] >= 5


def test_the_check_can_fail():
    """A snippet that raises, and a doctest whose shown output is not what runs, fail the
    check naming the page and the snippet."""
    with pytest.raises(AssertionError, match=r"page\.md, snippet 1 \(python\) raised NameError"):
        run_page("```python\nx = 1\n```\n\n```python\nundefined_name\n```\n", "page.md")
    with pytest.raises(AssertionError, match=r"page\.md, snippet 0 \(pycon\)"):
        run_page("```pycon\n>>> 1 + 1\n3\n```\n", "page.md")
    assert run_page("```pycon\n>>> model.weight.shape\ntorch.Size([1, 1, 3, 3])\n```\n"
                    "```python\nloss = torch.nn.BCEWithLogitsLoss()\n```\n", "page.md") == 2
