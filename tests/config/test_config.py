import pytest

from ddil_core.config import ConfigError, dump_config, load_config


def test_tiny_recipe_loads_and_overrides_apply():
    config = load_config("tiny", ["training.steps=3", "ddil.priors.forward=1", "ddil.priors.teacher=0",
                                  "ddil.priors.student=0", "model.teacher=tiny://sdxl"])
    assert config.training.steps == 3
    assert config.ddil.priors.forward == 1.0
    assert config.model.teacher == "tiny://sdxl"
    assert "steps: 3" in dump_config(config)


def test_unknown_key_names_the_nearest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'training.stpes'.*did you mean 'steps'"):
        load_config("tiny", ["training.stpes=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'ddill'.*did you mean 'ddil'"):
        load_config(None, ["ddill.priors.forward=1"])


def test_priors_must_sum_to_one_and_be_non_negative():
    with pytest.raises(ConfigError, match=r"ddil.priors must sum to 1.*= 1.2"):
        load_config("tiny", ["ddil.priors.forward=0.7"])
    with pytest.raises(ConfigError, match=r"ddil.priors.teacher = -0.25 must be in \[0, 1\]"):
        load_config("tiny", ["ddil.priors.forward=1", "ddil.priors.teacher=-0.25"])


def test_student_steps_must_be_fewer_than_teacher_steps():
    with pytest.raises(ConfigError, match=r"objective.student_steps = 4 must be fewer than objective.pd.teacher_steps = 4"):
        load_config("tiny", ["objective.student_steps=4"])


def test_wrong_types_and_choices_are_named():
    with pytest.raises(ConfigError, match=r"training.steps: expected an integer, got 'many'"):
        load_config("tiny", ["training.steps=many"])
    with pytest.raises(ConfigError, match=r"ddil.buffer.eviction: 'lifo' is not one of"):
        load_config("tiny", ["ddil.buffer.eviction=lifo"])
    with pytest.raises(ConfigError, match=r"unknown target 'teacher_target'.*did you mean 'teacher_targets'"):
        load_config("tiny", ["ddil.reflection.apply_to=[teacher_target]"])


def test_missing_recipe_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(str(bad))


def test_yaml_off_and_no_stay_choices():
    config = load_config("tiny", ["ddil.reflection.mode=off", "training.mixed_precision=no", "training.lr=1e-4"])
    assert config.ddil.reflection.mode == "off" and config.training.mixed_precision == "no"
    assert config.training.lr == 1e-4


@pytest.mark.parametrize("recipe", ["sd15-pd", "sd15-lcm", "ssd1b-dmd2", "sd15-tdd", "sdxl-tdd"])
def test_paper_recipes_are_valid(recipe):
    config = load_config(recipe)
    assert config.objective.name in recipe


def test_an_override_is_blamed_for_its_own_mistake_not_the_recipe(tmp_path):
    """A typo, a wrong type or a value out of range in --set names that --set, not the recipe file."""
    cases = {
        "data.shard_sise=3": "--set data.shard_sise=3: unknown config key 'data.shard_sise'; did you mean 'shard_size'?",
        "training.steps=many": "--set training.steps=many: training.steps: expected an integer, got 'many'",
        "data.shard_size=0": "--set data.shard_size=0: data.shard_size = 0 must be at least 1",
        "ddil.priors.forward=0.9": "--set ddil.priors.forward=0.9: ddil.priors must sum to 1",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as info:
            load_config("tiny", ["training.steps=3", override])
        assert str(info.value).startswith(message), str(info.value)
        assert "tiny.yaml" not in str(info.value)
    # The recipe's own mistakes still name the recipe, beside an override's.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  shard_size: 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(recipe), ["training.lr=2"])
    assert str(info.value) == (f"{recipe}: data.shard_size = 0 must be at least 1; "
                               "--set training.lr=2: training.lr = 2.0 must be in (0, 1]")
    recipe.write_text("data:\n  shard_sise: 3\n")
    with pytest.raises(ConfigError, match=rf"^{recipe}: unknown config key 'data.shard_sise'"):
        load_config(str(recipe), ["training.steps=3"])
