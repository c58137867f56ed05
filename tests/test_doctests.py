"""Every worked example in a docstring of the package runs and gives what it says."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import specprobe

SKIP = ("specprobe.__main__",)  # runs the command line on import
MODULES = sorted(m.name for m in pkgutil.walk_packages(specprobe.__path__, "specprobe.") if m.name not in SKIP)


def test_some_modules_have_examples():
    with_examples = [m for m in MODULES if doctest.DocTestFinder().find(importlib.import_module(m))
                     and any(t.examples for t in doctest.DocTestFinder().find(importlib.import_module(m)))]
    assert len(with_examples) >= 10, with_examples


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    failed, _ = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert failed == 0
