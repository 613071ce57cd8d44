"""Settings validation: bad values fail at start-up with a message naming the setting."""

from __future__ import annotations

import pytest

from server.config import LoraMode, Settings, parse_settings


def test_defaults_are_valid():
    s = Settings()
    assert s.model == "embedded" and s.quantization == "nf4" and s.lora_mode is LoraMode.UNMERGED
    assert s.host == "127.0.0.1"


def test_env_and_cli_flags(monkeypatch):
    monkeypatch.setenv("LORAPLEX_MAX_SLOTS", "12")
    monkeypatch.setenv("LORAPLEX_LORA_MODE", "merged")
    s = parse_settings(["--port", "9001", "--no-cuda-graphs"])
    assert (s.max_slots, s.lora_mode, s.port, s.cuda_graphs) == (12, LoraMode.MERGED, 9001, False)


@pytest.mark.parametrize("argv,field", [
    (["--port", "70000"], "port"), (["--max-slots", "0"], "max_slots"), (["--lora-mode", "fast"], "lora_mode"),
    (["--quantization", "int3"], "quantization"), (["--model", "/no/such/dir"], "model"),
    (["--auth-file", "/no/such.toml"], "auth_file"), (["--host", "0.0.0.0"], "host"),
    (["--device", "tpu"], "device"),
])
def test_bad_values_exit_naming_the_setting(argv, field, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_settings(argv)
    assert exc.value.code == 2
    assert field in capsys.readouterr().err


def test_unknown_env_setting_is_rejected():
    with pytest.raises(ValueError, match="max_slotz"):
        Settings(max_slotz=3)


def test_a_misspelt_environment_variable_stops_the_start(monkeypatch, capsys):
    """pydantic-settings' extra="forbid" covers keyword arguments, not LORAPLEX_* variables: parse_settings
    refuses the ones that are neither a setting nor a known switch, naming the closest known one."""
    monkeypatch.setenv("LORAPLEX_MAX_SLOT", "4")
    monkeypatch.setenv("LORAPLEX_PDL", "0")  # a kernel switch: known
    with pytest.raises(SystemExit) as exc:
        parse_settings([])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "LORAPLEX_MAX_SLOT (did you mean LORAPLEX_MAX_SLOTS?)" in err
    assert "LORAPLEX_PDL" not in err
    monkeypatch.delenv("LORAPLEX_MAX_SLOT")
    monkeypatch.setenv("loraplex_max_slots", "4")  # read case-insensitively, as pydantic-settings does
    assert parse_settings([]).max_slots == 4


def test_every_variable_the_code_reads_is_a_setting_or_a_switch():
    """Each LORAPLEX_* name in the Python of server/, bench/ and tests/ is a setting or in env_switches.SWITCHES,
    and each switch is still read somewhere: a new switch must be listed or the server would refuse it."""
    import re
    from pathlib import Path

    from server import env_switches

    root = Path(__file__).resolve().parents[2]
    names = set()
    for folder in ("server", "bench", "tests"):
        for path in (root / folder).rglob("*.py"):
            if path == Path(__file__).resolve():  # this file's misspelt name on purpose
                continue
            names |= set(re.findall(r"[\"'](LORAPLEX_[A-Z0-9_]*[A-Z0-9])[\"'=]", path.read_text()))
    settings = {"LORAPLEX_" + name.upper() for name in Settings.model_fields}
    assert names - settings - env_switches.SWITCHES == set()
    assert env_switches.SWITCHES - names == set()
    deployed = set()  # and the manifests' container environments name settings only
    for path in (root / "deploy").rglob("*.yaml"):
        deployed |= set(re.findall(r"name: (LORAPLEX_[A-Z0-9_]*[A-Z0-9])", path.read_text()))
    assert deployed and deployed <= settings
