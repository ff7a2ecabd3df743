import subprocess
import sys

import pytest

from mmfm.config import ConfigError, field_docs, load_config, to_yaml


def test_defaults_are_valid():
    cfg = load_config()
    assert cfg.model.num_kv_heads == cfg.model.n_heads
    assert cfg.micro_batches_per_step == 1


def test_recipe_and_overrides_merge(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 1.0e-2\ntrain:\n  steps: 7\n")
    cfg = load_config(recipe, ["optim.lr=3e-4", "data.loss_weights.dna=0.5"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.steps == 7
    assert cfg.data.loss_weights == {"dna": 0.5}


@pytest.mark.parametrize(
    ("override", "unknown", "closest"),
    [
        ("optim.lrr=1", "optim.lrr", "optim.lr"),
        ("trian.steps=3", "trian", "train"),
        ("model.n_kv_head=2", "model.n_kv_head", "model.n_kv_heads"),
    ],
)
def test_unknown_override_names_key_and_closest(override, unknown, closest):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert f"unknown config key '{unknown}'" in str(err.value)
    assert f"did you mean '{closest}'" in str(err.value)


def test_unknown_key_in_recipe_names_file(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model:\n  n_layer: 2\n")
    with pytest.raises(
        ConfigError, match=r"model.n_layer' in .*bad.yaml; did you mean 'model.n_layers'"
    ):
        load_config(recipe)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model.n_heads=6", "model.n_kv_heads=4", "model.dim=48"],
            "divisible by model.n_kv_heads",
        ),
        (
            ["model.dim=100", "model.n_heads=8"],
            "model.dim .100. must be divisible by model.n_heads",
        ),
        (["data.seq_len=0"], "data.seq_len must be positive"),
        (["data.seq_len=8192", "model.max_seq_len=4096"], "raise model.max_seq_len or lower"),
        (["train.global_batch_size=6", "train.micro_batch_size=4"], "must be a multiple of"),
        (["model.attention=fast"], "model.attention='fast' is not one of"),
        (["data.loss_weights.txt=1"], "unknown modality 'txt'"),
        (["optim.min_lr_ratio=2"], "optim.min_lr_ratio must be within"),
        (["model.dim=abc"], r"could not be converted to Integer \(key model.dim\)"),
    ],
)
def test_invalid_values_say_what_to_change(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def _schemas():
    from mmfm.config.schema import Config
    from mmfm.prepare.recipe import PrepareRecipe
    from mmfm.tokenization.recipe import TokenizerRecipe
    from mmfm.tokenization.visual.train import VisualRecipe

    return [Config, PrepareRecipe, TokenizerRecipe, VisualRecipe]


@pytest.mark.parametrize("schema", _schemas(), ids=lambda s: s.__name__)
def test_every_field_has_a_docstring(schema):
    docs = list(field_docs(schema))
    assert len(docs) > 10
    missing = [key for key, _, _, doc in docs if not doc]
    assert not missing, f"fields without a docstring: {missing}"


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["model.n_layers=3", "data.paths=[a.tar,b.tar]"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


def test_now_resolver_is_resolved_once():
    cfg = load_config(None, ["train.run_dir=runs/x-${now:%Y}"])
    assert "${" not in cfg.train.run_dir and cfg.train.run_dir.startswith("runs/x-20")


def test_cli_reports_config_errors_without_traceback():
    out = subprocess.run(
        [sys.executable, "-m", "mmfm", "config", "launch/demo.yaml", "optim.lrr=1"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "did you mean 'optim.lr'" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_config_doc_lists_fields(capsys):
    from mmfm.cli import main

    # in this process (a fresh `mmfm` process: the test above); main returns on success
    main(["config", "--doc"])
    assert "model.rope_theta (float, default 10000.0)" in capsys.readouterr().out


TWO_SOURCES = (
    "data:\n  sources:\n    - {name: a, paths: [a/]}\n    - {name: b, paths: [b/], weight: 2}\n"
)


@pytest.mark.parametrize("key", ["data.sources.1.paths", "data.sources[1].paths"])
def test_an_override_sets_one_entry_of_a_list(tmp_path, key):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TWO_SOURCES)
    cfg = load_config(recipe, [f"{key}=[mine/]", "data.sources[0].fields.text=[json:caption]"])
    a, b = cfg.data.sources
    assert (a.paths, b.paths, b.weight, b.name) == (["a/"], ["mine/"], 2.0, "b")
    assert a.fields.text == ["json:caption"] and a.fields.record == "image-text"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.sources[2].paths=[x]", r"data.sources\[2\]: data.sources has 2 entries"),
        ("data.sources.0.pahts=[x]", r"'data.sources\[0\].pahts'.*did you mean .*paths"),
        ("data.sources.first.paths=[x]", r"data.sources is a list: .*data.sources\[0\]"),
        ("data.paths[0]=x", r"data.paths has 0 entries"),
        ("data.sources[0].weight=${oc.env:W}", r"reads an environment variable"),
    ],
)
def test_a_bad_list_index_override_names_it_and_the_length(tmp_path, override, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TWO_SOURCES)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(recipe, [override])
    assert f"override {override!r}" in str(err.value)


def test_prepare_recipe_header_entry_override_works(tmp_path):
    """launch/himtok.yaml says: `mmfm prepare data_pipelines/himtok-referring.yaml
    (sources[0].paths: your VOC export)`."""
    from mmfm.prepare.recipe import load_prepare_recipe

    for folder in ("JPEGImages", "SegmentationClass"):
        (tmp_path / "VOC" / folder).mkdir(parents=True)
    mine = tmp_path / "VOC"
    recipe = load_prepare_recipe(
        "data_pipelines/himtok-referring.yaml", [f"sources[0].paths=[{mine}]"]
    )
    (source,) = recipe.sources
    assert source.paths == [str(mine)] and source.kind == "voc" and source.completion_only


def test_doc_lists_the_fields_of_list_entries():
    from mmfm.prepare.recipe import PrepareRecipe

    docs = {key: (kind, doc) for key, kind, _, doc in field_docs()}
    assert docs["data.sources"][0] == "list[SourceConfig]"
    assert docs["data.sources[].kind"] == (
        "str",
        "webdataset (tar shards) or megatron (Megatron-LM indexed datasets, read by "
        "megatron-core: pip install 'mmfm[megatron]'; text unless written by mmfm prepare "
        "with format: megatron).",
    )
    for key in ("paths", "weight", "tokenize", "fields.record", "fields.text"):
        assert docs[f"data.sources[].{key}"][1] and f"eval.sources[].{key}" in docs
    prepare = {key: doc for key, _, _, doc in field_docs(PrepareRecipe)}
    for key in ("kind", "paths", "fields.record", "uncond_ratio", "completion_only"):
        assert prepare[f"sources[].{key}"]
    assert prepare["sources[].kind"].startswith("text (jsonl records")


def test_config_doc_command_documents_each_schema(capsys):
    from mmfm.cli import main

    main(["config", "--doc", "prepare"])
    out = capsys.readouterr().out
    assert out.startswith("name (str") and "\nsources[].max_pixels (int, default 67108864)" in out
    main(["config", "--doc"])
    assert "\ndata.sources[].tokenize (str, default '')\n    Tokenizer recipe" in (
        capsys.readouterr().out
    )


def test_sources_on_the_command_line_replace_the_recipes_paths():
    """launch/demo.yaml sets data.paths; switching it to data.sources needs nothing more."""
    cfg = load_config("launch/demo.yaml", ["data.sources=[{name: a, paths: [a/]}]"])
    assert cfg.data.paths == [] and [s.paths for s in cfg.data.sources] == [["a/"]]
    cfg = load_config("launch/demo.yaml", ["data.paths=null", "eval.sources=[{paths: [h/]}]"])
    assert cfg.data.paths == [] and cfg.eval.sources[0].paths == ["h/"]
    assert load_config(None, ["data.loss_weights=null"]).data.loss_weights == {}
    for both in (["data={paths: [a/], sources: [{paths: [b/]}]}"], ["data.paths=[a/]", BOTH]):
        with pytest.raises(ConfigError, match=r"set data.paths \(one source\) or data.sources"):
            load_config("launch/demo.yaml", both)


BOTH = "data.sources=[{paths: [b/]}]"


@pytest.mark.parametrize(
    ("recipe", "overrides", "origin"),
    [
        (None, ["eval.every=50"], "override 'eval.every=50'"),
        ("eval:\n  every: 50\n", [], "r.yaml"),
    ],
)
def test_eval_every_without_held_out_data_is_refused(tmp_path, recipe, overrides, origin):
    path = None
    if recipe is not None:
        path = tmp_path / "r.yaml"
        path.write_text(recipe)
    message = f"{origin}: eval.every=50 has no held-out data to evaluate: set eval.paths or eval"
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(path, overrides)
    assert load_config(path, [*overrides, "eval.paths=[h/]"]).eval.every == 50


def test_a_saved_config_without_held_out_data_loads(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(load_config(None)))  # the defaults: every 500, no held-out data
    assert load_config(path).eval.every == 500 and not load_config(path).eval.enabled
