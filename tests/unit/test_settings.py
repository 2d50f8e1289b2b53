from pathlib import Path

import pytest
from pydantic import ValidationError

from cascade_server.settings import Settings


def test_environment_is_read_with_the_cascade_prefix(monkeypatch):
    monkeypatch.setenv("CASCADE_BUNDLES", "a/b, c")
    monkeypatch.setenv("CASCADE_TEACHER_TIMEOUT_S", "0.25")
    monkeypatch.setenv("CASCADE_ADMIN_TOKEN", "s3cret")
    s = Settings()
    assert s.bundles == [Path("a/b"), Path("c")]
    assert s.teacher_timeout_s == 0.25
    assert s.admin_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(s)


def test_empty_admin_token_means_none(monkeypatch):
    monkeypatch.setenv("CASCADE_ADMIN_TOKEN", "")
    assert Settings().admin_token is None


def test_invalid_values_fail_at_start(monkeypatch):
    monkeypatch.setenv("CASCADE_TEACHER_TIMEOUT_S", "-1")
    with pytest.raises(ValidationError):
        Settings()
