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


@pytest.mark.parametrize("recipe", ["sd15-pd", "sd15-lcm", "ssd1b-dmd2"])
def test_paper_recipes_are_valid(recipe):
    config = load_config(recipe)
    assert config.objective.name in recipe
