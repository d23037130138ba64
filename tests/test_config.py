"""params.yaml is the documentation of the defaults: deleting a key leaves the run unchanged, because
every dataclass default (and every method's hyper-parameter default) equals the shipped value."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import yaml
from conftest import ROOT

from kdcompress.config import SECTIONS, load_params
from kdcompress.methods import LOSSES, method_defaults
from kdcompress.types import UserError

SHIPPED = yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_dataclass_defaults_equal_the_shipped_params(section):
    defaults = dataclasses.asdict(SECTIONS[section]())
    assert defaults == SHIPPED[section]


@pytest.mark.parametrize("name", sorted(set(LOSSES) - {"ce"}))
def test_method_defaults_equal_the_shipped_params(name):
    assert method_defaults(name) == SHIPPED["methods"][name]


def test_an_empty_params_file_runs_the_shipped_defaults(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    empty, shipped = load_params(tmp_path / "params.yaml"), load_params(ROOT / "params.yaml")
    assert {k: v for k, v in empty.items() if k != "methods"} == {k: v for k, v in shipped.items() if k != "methods"}


@pytest.mark.parametrize("changes, message", [
    ({"sakd": {"ratio": 0.3}}, "sakd.ratio: 0.3 does nothing unless distill.sampling is 'sakd' or 'random'; "
                               "allowed here: 0.5"),
    ({"sakd": {"normalise": "minmax"}}, "sakd.normalise: 'minmax' does nothing unless distill.sampling is 'sakd'; "
                                        "allowed here: 'rank'"),
    ({"routing": {"init": "even"}}, "routing.init: 'even' does nothing unless distill.spots is 'adaptive'"),
    ({"teacher": {"checkpoint": "mine.pt", "lr": 0.5}}, "teacher.lr: 0.5 does nothing unless teacher.checkpoint is "
                                                        "empty; allowed here: 0.2"),
])
def test_a_setting_that_does_nothing_in_this_mode_is_refused(tmp_path, changes, message):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in changes.items():
        params[section].update(values)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        load_params(tmp_path / "params.yaml")
    for section, values in changes.items():  # the same values are taken in the mode they belong to
        params[section].update({"sakd": {}, "routing": {}, "teacher": {"checkpoint": ""}}[section])
    params["distill"].update(sampling="sakd", spots="adaptive")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize("stage", ["ship", "leaderboard"])
def test_stages_that_read_no_params_take_no_params_option(stage, capsys):
    main = importlib.import_module(f"pipeline.{stage}").main
    assert main(["--params", "params.yaml"]) == 2
    assert "unrecognized arguments: --params params.yaml" in capsys.readouterr().err
