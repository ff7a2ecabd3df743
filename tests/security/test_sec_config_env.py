"""`${oc.env:VAR}` in a recipe or an override: refused, so that no environment value (a token,
a password) is copied into `config.yaml`, checkpoints, logs or tracker params; the refusal is
one config line naming the recipe or override and the opt-in, `MMFM_ALLOW_OC_ENV=1`."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mmfm.cli import main
from mmfm.config import ConfigError, load_config, load_structured, to_yaml
from mmfm.prepare.recipe import PrepareRecipe

DEMO = str(Path(__file__).resolve().parents[2] / "launch/demo.yaml")
SECRET = "s3cr3t-token-value"


@pytest.fixture(autouse=True)
def _secret(monkeypatch):
    monkeypatch.setenv("MMFM_TEST_TOKEN", SECRET)
    monkeypatch.delenv("MMFM_ALLOW_OC_ENV", raising=False)


@pytest.mark.parametrize(
    "value",
    [
        "${oc.env:MMFM_TEST_TOKEN}",
        "runs/${oc.env:MMFM_TEST_TOKEN,default}",
        "${ oc.env :MMFM_TEST_TOKEN}",
        "${oc.decode:${oc.env:MMFM_TEST_TOKEN}}",
    ],
)
def test_a_recipe_reading_the_environment_is_refused(tmp_path, value):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"train:\n  run_dir: '{value}'\n")
    with pytest.raises(ConfigError) as refused:
        load_config(recipe)
    message = str(refused.value)
    assert str(recipe) in message and "train.run_dir" in message
    assert "MMFM_ALLOW_OC_ENV=1" in message
    assert SECRET not in message and len(message.splitlines()) == 1


def test_an_override_reading_the_environment_is_one_config_line(capsys, tmp_path):
    override = "train.run_dir=${oc.env:MMFM_TEST_TOKEN}"
    with pytest.raises(SystemExit) as refused:
        main(["config", DEMO, override])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and err.startswith("mmfm: config error: override")
    assert override in err and "MMFM_ALLOW_OC_ENV=1" in err and len(err.splitlines()) == 1
    assert SECRET not in err


def test_other_recipes_are_refused_too(tmp_path):
    """Every recipe goes through `load_structured`: data recipes, in a list, too."""
    recipe = tmp_path / "prep.yaml"
    recipe.write_text("sources:\n  - {kind: text, paths: ['${oc.env:MMFM_TEST_TOKEN}']}\n")
    with pytest.raises(ConfigError, match=r"sources\.0\.paths\.0 reads an environment"):
        load_structured(PrepareRecipe, recipe)


def test_the_resolver_itself_refuses_without_the_opt_in():
    """The guard behind the text check, for a reference it would not see."""
    with pytest.raises(Exception, match="MMFM_ALLOW_OC_ENV"):
        OmegaConf.to_container(OmegaConf.create({"a": "${oc.env:MMFM_TEST_TOKEN}"}), resolve=True)


def test_the_opt_in_resolves_and_other_interpolations_stay(monkeypatch, tmp_path):
    cfg = load_config(None, ["train.run_dir=runs/${now:%Y}-${train.steps}"])
    assert cfg.train.run_dir.startswith("runs/2") and SECRET not in to_yaml(cfg)
    monkeypatch.setenv("MMFM_ALLOW_OC_ENV", "1")
    cfg = load_config(None, ["train.run_dir=runs/${oc.env:MMFM_TEST_TOKEN}"])
    assert cfg.train.run_dir == f"runs/{SECRET}"
