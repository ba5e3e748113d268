"""Sphinx configuration for the ublk-runner documentation.

Build (warnings are errors, as in CI):

    .venv/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html

The reference pages are generated from the code by the small extensions in
``docs/_ext`` (configuration schema, handler options, CLI help, kernel feature
table), so they cannot drift from what the runner actually accepts.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # the runner package, importable without an install
sys.path.insert(0, os.path.join(HERE, "_ext"))

project = "ublk-runner"
author = "the ublk-runner authors"
copyright = "the ublk-runner authors"

try:
    from importlib.metadata import version as _version

    release = _version("ublk-runner")
except Exception:  # pragma: no cover - docs built from a bare checkout
    release = "0.1.0"
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "ublk_docs",
]

# No network during builds: no intersphinx.
exclude_patterns = ["_build", "examples/handler/build", "**/*.egg-info"]
templates_path = []
html_static_path = []
html_theme = "alabaster"
html_title = f"ublk-runner {release}"
html_show_sourcelink = False

root_doc = "index"
default_role = "literal"
highlight_language = "none"
pygments_style = "sphinx"

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_default_options = {
    "members": True,
    "show-inheritance": False,
}

# Nitpicky mode (-n): without intersphinx, standard-library and third-party
# names cannot resolve; ignore those, keep our own cross-references checked.
nitpick_ignore_regex = [
    (r"py:.*", r"(typing|collections\.abc|concurrent\.futures|asyncio|argparse|importlib\.metadata|pluggy|threading|mmap|os)\..*"),
    (r"py:class", r"(Any|Awaitable|ClassVar|Iterable|Iterator|Mapping|Sequence|Callable|NoneType|Ellipsis)"),
    (r"py:class", r"(int|str|bytes|bytearray|memoryview|bool|float|dict|list|tuple|set|type|object|None|Exception|BaseException|OSError|ValueError|TypeError|KeyError|RuntimeError)"),
    (r"py:(class|obj|exc)", r"(cdata|ffi|lib|_Capability|_Missing|_Marks|Node|EntryPoint|_F)"),
    (r"py:class", r"runner\.config\._Marks"),
    (r"py:meth", r"(get|names)"),
    (r"py:class", r"ConfigError"),  # runner.config docstrings name the re-exported class  # duck-typed registry in runner.config.validate
    (r"py:attr", r"can_(write|flush|discard)"),  # descriptors without doc comments
]
