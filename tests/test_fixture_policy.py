"""Parity fixtures: a plain clone (no ../shared) skips the parity tests with a reason; CI makes them required."""

import conftest
import pytest


def test_missing_fixtures_skip_with_the_path(tmp_path, monkeypatch):
    monkeypatch.delenv(conftest.REQUIRE_FIXTURES, raising=False)
    with pytest.raises(pytest.skip.Exception, match="parity fixtures are not at .*absent"):
        conftest.find_fixtures(tmp_path / "absent")


def test_missing_fixtures_fail_when_required(tmp_path, monkeypatch):
    monkeypatch.setenv(conftest.REQUIRE_FIXTURES, "1")
    with pytest.raises(FileNotFoundError, match="absent.*VQLC_REQUIRE_FIXTURES=1 makes them required"):
        conftest.find_fixtures(tmp_path / "absent")


def test_present_fixtures_are_returned(tmp_path, monkeypatch):
    monkeypatch.setenv(conftest.REQUIRE_FIXTURES, "1")
    assert conftest.find_fixtures(tmp_path) == tmp_path
