"""The config of every stage: the typed schema (schema.py: each section's dataclass), recipes and `--set a.b=c` overrides (load.py), and
every check, each rule once (checks.py). Unknown keys are rejected with the nearest valid key named; invalid values
with a message naming the key and what is wrong.

The modules import in one direction, schema <- checks <- load, so each imports on its own in any order; limits.py
(the bound of every input) and redaction.py (secrets masked in everything written) import nothing.
"""
from ddil_core.config.checks import config_problems, validate
from ddil_core.config.load import (_merge, config_from_dict, load_config, parse_override, recipe_path,
                                   yaml_error_line)
from ddil_core.config.schema import LORA_TARGETS, REFLECTION_TARGETS, Config, ConfigError, dump_config, resolved_dict

__all__ = ["Config", "ConfigError", "load_config", "config_from_dict", "parse_override", "recipe_path",
           "yaml_error_line", "validate", "config_problems", "resolved_dict", "dump_config", "_merge",
           "LORA_TARGETS", "REFLECTION_TARGETS"]
