from __future__ import annotations

import pytest

from karma8.core.errors import InvalidName, Karma8Error, NotFound, error_from_code
from karma8.core.names import check_name, check_namespace


@pytest.mark.parametrize("name", ["a", "dir/file.txt", "ünïcode/名前", "a" * 1024, "x y"])
def test_valid_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "/abs", "trailing/", "a//b", "a/./b", "../up", "nul\x00", "tab\there", "é" * 600]
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidName):
        check_name(name)


@pytest.mark.parametrize("namespace", ["default", "a", "team-1", "x_y"])
def test_valid_namespaces(namespace: str) -> None:
    assert check_namespace(namespace) == namespace


@pytest.mark.parametrize("namespace", ["", "Upper", "-lead", "a/b", "a" * 64, "sp ace"])
def test_invalid_namespaces(namespace: str) -> None:
    with pytest.raises(InvalidName):
        check_namespace(namespace)


def test_errors_round_trip_by_code() -> None:
    error = error_from_code(NotFound.code, "gone")
    assert isinstance(error, NotFound)
    assert error.message == "gone"
    assert type(error_from_code("no-such-code", "x")) is Karma8Error
