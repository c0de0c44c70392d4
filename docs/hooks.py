"""MkDocs hooks: put files that live outside ``docs/`` into the site at build time.

- MathJax, from the ``django-static-mathjax`` wheel (a ``docs`` extra), so that the pages
  render their formulas without a CDN.
- The benchmark plots from ``benchmarks/results/`` (the tables are included as snippets by
  ``docs/performance.md``), so that the page always shows the committed results.

Registered in ``mkdocs.yml`` under ``hooks:``; excluded from the pages by ``exclude_docs``.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PLOTS = [
    "bench_nvidia-h100-80gb-hbm3.png",
]


def _mathjax_script() -> Path:
    try:
        import mathjax  # the django-static-mathjax wheel; no Django needed
    except ImportError as err:  # pragma: no cover - a missing docs extra
        raise RuntimeError(
            "MathJax for the docs comes from the 'django-static-mathjax' package: "
            'pip install -e ".[docs]"'
        ) from err
    script = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5" / "tex-svg.js"
    if not script.is_file():
        raise RuntimeError(f"{script} is missing from the django-static-mathjax package")
    return script


def on_files(files: Files, config: MkDocsConfig) -> Files:
    files.append(
        File.generated(config, "assets/mathjax/tex-svg.js", abs_src_path=str(_mathjax_script()))
    )
    for name in PLOTS:
        plot = RESULTS / name
        if not plot.is_file():
            raise RuntimeError(f"benchmark plot {plot} is missing")
        files.append(
            File.generated(config, f"assets/results/{plot.name}", abs_src_path=str(plot))
        )
    return files
