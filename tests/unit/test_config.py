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
