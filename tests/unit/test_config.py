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


def test_an_experiment_extends_its_base_section_by_section(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "seed: 3\nteacher: {arch: cnn, params: {width: 32}, epochs: 40, lr: 0.01}\n"
        "method: {name: kd, params: {temperature: 4.0, a: 0.5}}\n"
    )
    (tmp_path / "exp.yaml").write_text(
        "extends: base.yaml\nname: exp\nteacher: {params: {width: 8}, epochs: 2}\n"
        "method: {name: md, params: {rho_train: 0.3}}\n"
    )
    c = load_config(tmp_path / "exp.yaml", ["teacher.lr=0.1"])
    assert c.name == "exp" and c.seed == 3
    # Sections merge key by key; `params` are replaced whole (kd's knobs are no md knobs).
    assert (c.teacher.arch, c.teacher.epochs, c.teacher.lr) == ("cnn", 2, 0.1)
    assert c.teacher.params == {"width": 8}
    assert c.method.name == "md" and c.method.params == {"rho_train": 0.3}


def test_extends_chains_and_refuses_a_loop(tmp_path):
    (tmp_path / "a.yaml").write_text("seed: 1\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("extends: ../a.yaml\nname: b\n")
    (tmp_path / "c.yaml").write_text("extends: sub/b.yaml\nfit: {epochs: 2}\n")
    c = load_config(tmp_path / "c.yaml")
    assert (c.seed, c.name, c.fit.epochs) == (1, "b", 2)
    (tmp_path / "x.yaml").write_text("extends: y.yaml\n")
    (tmp_path / "y.yaml").write_text("extends: x.yaml\n")
    with pytest.raises(ValueError, match="loops back"):
        load_config(tmp_path / "x.yaml")


def test_shipped_experiments_differ_from_their_base_only_where_they_say():
    base = load_config(ROOT / "configs" / "digits" / "base.yaml")
    md = load_config(ROOT / "configs" / "digits" / "md.yaml")
    assert md.model_dump(exclude={"name", "method"}) == base.model_dump(exclude={"name", "method"})
    assert md.method.name == "md"
