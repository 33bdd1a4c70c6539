"""One error base: every exception class the package raises on purpose lives in orthanc_cbir.errors
and derives from CbirError; none carries an HTTP status."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import orthanc_cbir
from orthanc_cbir import errors

PACKAGE = Path(orthanc_cbir.__file__).parent


def test_every_public_exception_class_is_defined_in_the_errors_module():
    elsewhere = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                bases = {ast.unparse(base) for base in node.bases}
                if any(base.endswith(("Error", "Exception")) for base in bases):
                    elsewhere.append(f"{path.relative_to(PACKAGE)}: {node.name}")
    assert elsewhere == []


def test_every_error_derives_from_the_base_and_none_carries_a_status():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass)
               if c.__module__ == errors.__name__ and issubclass(c, BaseException)]  # fmt: skip
    assert len(classes) >= 10
    for error in classes:
        assert issubclass(error, errors.CbirError), error
        assert not {"status", "status_code", "http_status"} & set(vars(error)), error
