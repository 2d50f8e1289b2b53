from pathlib import Path

import pytest
from pydantic import ValidationError

from cascade_server.train.config import load_config
from cascade_server.train.demo import DEMO_CONFIG

ROOT = Path(__file__).resolve().parents[2]


def test_every_shipped_config_loads():
    configs = sorted((ROOT / "configs").rglob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


def test_the_demo_config_file_is_what_the_demo_builds():
    assert load_config(ROOT / "configs" / "digits" / "kd.yaml") == DEMO_CONFIG


def test_overrides_are_typed_and_nested(tmp_path):
    (tmp_path / "c.yaml").write_text("name: x\nfit: {epochs: 3}\n")
    c = load_config(
        tmp_path / "c.yaml",
        ["fit.epochs=7", "method.params.temperature=2.5", "student.params.hidden=[4, 4]"],
    )
    assert c.fit.epochs == 7
    assert c.method.params == {"temperature": 2.5}
    assert c.student.params == {"hidden": [4, 4]}


def test_typos_and_bad_values_fail_with_the_field_named(tmp_path):
    (tmp_path / "c.yaml").write_text("fit: {epoch: 3}\n")
    with pytest.raises(ValidationError, match=r"fit\.epoch"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ValidationError, match="target_delegation_rate"):
        load_config(None, ["calibration.target_delegation_rate=2"])
    with pytest.raises(ValueError, match=r"section\.key=value"):
        load_config(None, ["nonsense"])


def test_yaml_is_loaded_safely(tmp_path):
    (tmp_path / "c.yaml").write_text("name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(Exception, match="could not determine a constructor"):
        load_config(tmp_path / "c.yaml")
