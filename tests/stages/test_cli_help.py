"""The command line as a newcomer meets it: every option explains itself, the README's stage table shows each
command's flags as the parser has them (required bare, optional in brackets), and mistakes are named as what they
are (a missing local folder, a mistyped --set)."""
from __future__ import annotations

import argparse
import re

import pytest

from ddil_core.cli import build_parser, main
from tests import ROOT

COMMON = {"--config", "--set"}  # every stage's; the README says so once under the table


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def test_every_option_of_every_command_has_help_text():
    root = build_parser()
    parsers = {"ddil": root, **{f"ddil {name}": p for name, p in _subcommands(root).items()}}
    assert len(parsers) >= 9
    missing = [f"{where} {'/'.join(a.option_strings)}" for where, p in parsers.items() for a in _options(p)
               if not (a.help and a.help.strip()) or a.help == argparse.SUPPRESS]
    assert not missing, f"options without help text: {missing}"
    for name, p in _subcommands(root).items():
        assert p.description, f"ddil {name} has no description"


def _readme_rows() -> dict[str, str]:
    """The README's stage table: command name -> its usage cell."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## The stages"):]
    rows = {}
    for line in table.splitlines():
        match = re.match(r"\| `ddil ([a-z-]+) (.*?)` \|", line)
        if match:
            rows[match.group(1)] = match.group(2)
        elif rows and not line.startswith("|"):
            break
    return rows


def _flags(usage: str) -> tuple[set, set]:
    """(flags outside brackets, flags inside brackets) of a usage cell such as `--out DIR [--shard I]`."""
    optional = set(re.findall(r"--[a-z-]+", " ".join(re.findall(r"\[[^\]]*\]", usage))))
    required = set(re.findall(r"--[a-z-]+", re.sub(r"\[[^\]]*\]", "", usage)))
    return required, optional


def test_the_readme_stage_table_shows_each_commands_flags_as_the_parser_has_them():
    rows = _readme_rows()
    commands = _subcommands(build_parser())
    assert set(rows) == set(commands), (sorted(rows), sorted(commands))
    for name, usage in rows.items():
        required, optional = _flags(usage)
        actions = {a.option_strings[-1]: a for a in _options(commands[name])}
        assert not (required | optional) - set(actions), f"{name}: README shows unknown flags"
        for flag, action in actions.items():
            if flag in COMMON:
                continue
            shown = required if action.required else optional
            assert flag in shown, f"ddil {name}: {flag} should be shown {'bare' if action.required else 'in [...]'}"
    assert "--restart" in _flags(rows["distill"])[1] and "--allow-pickle" in _flags(rows["sample"])[1]
    text = (ROOT / "README.md").read_text()
    assert "[--config C]" in text and "[--set KEY=VALUE]" in text


def test_a_mistyped_local_model_folder_is_named_as_a_missing_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # runs/nope: a folder that is not there, not a Hub id to look up
    assert main(["sample", "--model", "runs/nope", "--prompt", "x", "--out", "x.png"]) == 2
    err = capsys.readouterr().err
    assert "ddil sample: error: runs/nope: no such folder" in err and "Hub" not in err and "cache" not in err
    assert main(["evaluate", "--config", "tiny", "--student", "runs/nope", "--out", "ev"]) == 2
    err = capsys.readouterr().err
    assert "ddil evaluate: error: runs/nope: no such folder (the student" in err
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize("override,message", [
    ("data.shard_sise=3", "--set data.shard_sise=3: unknown config key 'data.shard_sise'; did you mean 'shard_size'?"),
    ("data.shard_size=0", "--set data.shard_size=0: data.shard_size = 0 must be at least 1"),
])
def test_a_mistyped_set_is_named_not_the_recipe(tmp_path, capsys, override, message):
    assert main(["cache-latents", "--config", "tiny", "--set", override, "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"ddil cache-latents: error: {message}" and "tiny.yaml" not in err
