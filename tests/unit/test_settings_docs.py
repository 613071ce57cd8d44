"""The README settings table and `--help` say what the Settings model does: every field, its default."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from server import settings_docs
from server.config import Settings, parse_settings

README = Path(__file__).resolve().parents[2] / "README.md"
FIELDS = Settings.model_fields


def _readme_rows() -> dict[str, str]:
    """setting name -> default cell of the README settings table."""
    text = README.read_text(encoding="utf-8")
    block = text[text.index(settings_docs.TABLE_BEGIN):text.index(settings_docs.TABLE_END)]
    rows = {}
    for line in block.splitlines():
        match = re.match(r"^\| `([a-z0-9_]+)` \| `([^`]*)` \|", line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def test_readme_table_is_the_generated_one():
    text = README.read_text(encoding="utf-8")
    expected = settings_docs.replace_table(text, settings_docs.markdown_table(Settings))
    assert text == expected, "README settings table is stale: run `python -m server.settings_docs --write README.md`"


def test_readme_lists_every_setting_once_in_field_order():
    assert list(_readme_rows()) == list(FIELDS)


@pytest.mark.parametrize("name", list(FIELDS))
def test_readme_default_is_the_real_default(name, monkeypatch, tmp_path):
    """Passing the README's default back as the flag gives what Settings() gives with nothing set."""
    for var in os.environ:
        if var.startswith(settings_docs.ENV_PREFIX):
            monkeypatch.delenv(var)
    cell = _readme_rows()[name]
    actual = getattr(Settings(), name)
    if cell in ("unset", "none"):  # declared unset; a validator may derive it (max_prompt_chars)
        assert FIELDS[name].default in (None, []) or FIELDS[name].default_factory is list
        return
    value = str(Path(cell).expanduser()) if isinstance(actual, Path) else cell
    flag = settings_docs.flag_name(name)
    argv = [flag if cell == "true" else "--no-" + flag[2:]] if isinstance(actual, bool) else [flag, value]
    assert getattr(parse_settings(argv), name) == actual


@pytest.mark.parametrize("name", list(FIELDS))
def test_every_flag_has_help_default_choices_and_env(name, capsys):
    field = FIELDS[name]
    assert field.description, f"Settings.{name} has no description (it is the --help text and the README row)"
    with pytest.raises(SystemExit):
        parse_settings(["--help"])
    help_text = re.sub(r"\s+", " ", capsys.readouterr().out)
    options = help_text[help_text.index("options:"):]  # past the usage line, which names every flag too
    entry = options[re.search(re.escape(settings_docs.flag_name(name)) + "[ ,]", options).start():]
    entry = entry[:entry.index(settings_docs.env_name(name)) + len(settings_docs.env_name(name))]
    assert f"default: {settings_docs.default_text(field)}" in entry
    assert field.description.split()[0] in entry
    for choice in settings_docs.choices(field) or []:
        assert choice in entry
