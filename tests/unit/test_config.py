from __future__ import annotations

from pathlib import Path

import pytest

from streams.config import ConfigError, Secret, Settings


def test_env_values_are_typed_and_flags_win(tmp_path: Path) -> None:
    env = {
        "INFLOW_STATE_DIR": str(tmp_path),
        "INFLOW_KAFKA_BOOTSTRAP": "127.0.0.1:9092",
        "INFLOW_MAX_BATCH_SIZE": "16",
        "INFLOW_ES_VERIFY_CERTS": "false",
        "INFLOW_ES_API_KEY": "s3cret",
    }
    settings = Settings.load(env=env, overrides={"max_batch_size": 8, "web_port": None})
    assert settings.max_batch_size == 8
    assert settings.web_port == 6066
    assert settings.es_verify_certs is False
    assert isinstance(settings.es_api_key, Secret)
    assert "s3cret" not in repr(settings)
    assert settings.engine_dir == tmp_path / "engines"


def test_dev_env_file_fills_in_unset_endpoints(tmp_path: Path) -> None:
    (tmp_path / "dev.env").write_text(
        "INFLOW_KAFKA_BOOTSTRAP=127.0.0.1:1234\nINFLOW_ES_URL=http://127.0.0.1:5678\n"
    )
    settings = Settings.load(env={"INFLOW_STATE_DIR": str(tmp_path)})
    assert settings.kafka_bootstrap == "127.0.0.1:1234"
    assert settings.es_url == "http://127.0.0.1:5678"
    env = {"INFLOW_STATE_DIR": str(tmp_path), "INFLOW_ES_URL": "http://es:9200"}
    assert Settings.load(env=env).es_url == "http://es:9200"


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("INFLOW_MAX_BATCH_SIZE", "many", "must be an integer"),
        ("INFLOW_MAX_BATCH_SIZE", "0", "between 1 and 1024"),
        ("INFLOW_ES_URL", "localhost:9200", "http://host:9200"),
        ("INFLOW_KAFKA_BOOTSTRAP", "localhost", "host:port"),
        ("INFLOW_KAFKA_SECURITY_PROTOCOL", "TLS", "must be one of"),
        ("INFLOW_ES_VERIFY_CERTS", "maybe", "must be true or false"),
        ("INFLOW_PASSAGES_MAX", "0", "within 1..64"),
        ("INFLOW_PASSAGES_MAX", "65", "within 1..64"),
        ("INFLOW_PASSAGES_MAX", "eight", "must be an integer"),
    ],
)
def test_bad_values_give_one_line_errors(key: str, value: str, words: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.load(env={"INFLOW_STATE_DIR": str(tmp_path), key: value})
    message = str(caught.value)
    assert words in message and "\n" not in message


def test_sasl_needs_credentials(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SASL_USERNAME"):
        Settings.load(
            env={"INFLOW_STATE_DIR": str(tmp_path), "INFLOW_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}
        )


def test_missing_endpoints_say_what_to_run(tmp_path: Path) -> None:
    settings = Settings.load(env={"INFLOW_STATE_DIR": str(tmp_path)})
    with pytest.raises(ConfigError, match="inflow dev up"):
        settings.require_kafka()
    with pytest.raises(ConfigError, match="inflow dev up"):
        settings.require_es()
