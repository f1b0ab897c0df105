from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streams.config import NO_SECRET, Secret, Settings, effective_settings
from streams.errors import ConfigError, InflowError

ROOT = Path(__file__).resolve().parents[2]


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
        # one of each kind of field: int, float, bool, str with choices, str with a pattern,
        # Path, Secret
        ("INFLOW_MAX_BATCH_SIZE", "abc", "must be an integer, got 'abc'"),
        ("INFLOW_SESSION_TIMEOUT_S", "soon", "must be a number, got 'soon'"),
        ("INFLOW_WEB_ALLOW_ANONYMOUS", "perhaps", "must be true or false, got 'perhaps'"),
        ("INFLOW_PROCESSING_GUARANTEE", "twice", "one of at_least_once, exactly_once"),
        ("INFLOW_LOG_LEVEL", "loud", "one of debug, info, warning, error, critical"),
        ("INFLOW_TEXTS_TOPIC", "my texts", "a Kafka name"),
        ("INFLOW_ES_ALIAS", "Predictions", "an index name"),
        ("INFLOW_ENGINE_DIR", "", "must be a non-empty path, got ''"),
        ("INFLOW_STATE_DIR", " ", "must be a non-empty path"),
        ("INFLOW_ES_PASSWORD", "hunter2\n", "without line breaks"),
        # bounds
        ("INFLOW_MAX_BATCH_SIZE", "2000", "an integer between 1 and 1024, got '2000'"),
        ("INFLOW_WEB_PORT", "70000", "a TCP port (0-65535), got '70000'"),
        ("INFLOW_WEB_PORT", "-1", "a TCP port (0-65535)"),
        ("INFLOW_TOPIC_PARTITIONS", "0", "an integer of at least 1, got '0'"),
        ("INFLOW_DRAIN_TIMEOUT_S", "0", "a number above 0, got '0'"),
        ("INFLOW_LATENCY_TARGET_MS", "nan", "between 0 (off: fixed batching) and 600000"),
        ("INFLOW_MAX_IN_FLIGHT_BYTES", "1024", "at least 1048576 (1 MiB)"),
        # across fields
        ("INFLOW_MAX_IN_FLIGHT", "4", "at least INFLOW_MAX_BATCH_SIZE"),
        ("INFLOW_HEARTBEAT_INTERVAL_S", "6", "below INFLOW_SESSION_TIMEOUT_S"),
        ("INFLOW_DRIFT_MIN_SAMPLES", "2000", "within 1..INFLOW_DRIFT_WINDOW"),
    ],
)
def test_bad_values_give_one_line_errors(key: str, value: str, words: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.load(env={"INFLOW_STATE_DIR": str(tmp_path), key: value})
    message = str(caught.value)
    assert words in message and "\n" not in message
    assert message.startswith(key), message
    if "PASSWORD" in key:
        assert value.strip() not in message  # a secret is never echoed, even a bad one


def test_the_error_is_what_the_cli_prints_as_one_line() -> None:
    assert issubclass(ConfigError, InflowError)  # streams.cli.main: "inflow: error: ...", exit 2


def test_several_bad_values_still_make_one_line(tmp_path: Path) -> None:
    env = {"INFLOW_STATE_DIR": str(tmp_path), "INFLOW_WEB_PORT": "x", "INFLOW_LOG_LEVEL": "loud"}
    with pytest.raises(ConfigError) as caught:
        Settings.load(env=env)
    assert str(caught.value) == (
        "INFLOW_WEB_PORT must be an integer, got 'x' (also wrong: INFLOW_LOG_LEVEL)"
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(word, True) for word in ("1", "true", "YES", " on ")]
    + [(word, False) for word in ("0", "False", "no", "off")],
)
def test_bools_take_the_usual_words(raw: str, expected: bool, tmp_path: Path) -> None:
    env = {"INFLOW_STATE_DIR": str(tmp_path), "INFLOW_ES_VERIFY_CERTS": raw}
    assert Settings.load(env=env).es_verify_certs is expected


@pytest.mark.parametrize(("raw", "expected"), [("WARNING", "warning"), (" Debug ", "debug")])
def test_the_log_level_takes_any_case(raw: str, expected: str, tmp_path: Path) -> None:
    env = {"INFLOW_STATE_DIR": str(tmp_path), "INFLOW_LOG_LEVEL": raw}
    assert Settings.load(env=env).log_level == expected
    assert Settings.load(env=env, overrides={"log_level": "ERROR"}).log_level == "error"


def test_overrides_are_validated_like_the_environment(tmp_path: Path) -> None:
    env = {"INFLOW_STATE_DIR": str(tmp_path)}
    assert Settings.load(env=env, overrides={"max_batch_size": "16"}).max_batch_size == 16
    with pytest.raises(ConfigError, match=r"^INFLOW_MAX_BATCH_SIZE must be .* got 0$"):
        Settings.load(env=env, overrides={"max_batch_size": 0})
    with pytest.raises(ConfigError, match="not a setting"):
        Settings.load(env=env, overrides={"max_batch": 8})
    settings = Settings.load(env=env)
    assert settings.with_overrides(web_port=7000, web_host=None).web_port == 7000
    with pytest.raises(ConfigError, match="INFLOW_WEB_PORT"):
        settings.with_overrides(web_port=70000)


def test_precedence_flag_env_dev_env_default(tmp_path: Path) -> None:
    (tmp_path / "dev.env").write_text(
        "# written by inflow dev up\n"
        "INFLOW_MAX_BATCH_SIZE=2\nINFLOW_MAX_WAIT_MS=3\nINFLOW_WEB_PORT=7001\n"
        "INFLOW_STATE_DIR=/elsewhere\n"  # the file lives in the state dir: cannot move it
    )
    env = {
        "INFLOW_STATE_DIR": str(tmp_path),
        "INFLOW_MAX_BATCH_SIZE": "4",
        "INFLOW_MAX_WAIT_MS": "5",
    }
    overrides = {"max_batch_size": 6, "max_wait_ms": None}
    settings = Settings.load(env=env, overrides=overrides)
    assert settings.max_batch_size == 6  # flag over env over dev.env
    assert settings.max_wait_ms == 5  # env over dev.env (a None flag is no flag)
    assert settings.web_port == 7001  # dev.env over default
    assert settings.max_batch_tokens == 2048  # default
    assert settings.state_dir == tmp_path
    sources = {row.name: row.source for row in effective_settings(env, overrides)}
    assert sources["INFLOW_MAX_BATCH_SIZE"] == "flag"
    assert sources["INFLOW_MAX_WAIT_MS"] == "env"
    assert sources["INFLOW_WEB_PORT"] == str(tmp_path / "dev.env")
    assert sources["INFLOW_MAX_BATCH_TOKENS"] == "default"
    assert sources["INFLOW_STATE_DIR"] == "env"
    assert "INFLOW_EXTRA" not in sources  # set in code only


def test_engine_dir_follows_the_state_dir_unless_given(tmp_path: Path) -> None:
    assert Settings.load(env={"INFLOW_STATE_DIR": str(tmp_path)}).engine_dir == tmp_path / "engines"
    env = {"INFLOW_STATE_DIR": str(tmp_path), "INFLOW_ENGINE_DIR": "/srv/engines"}
    assert Settings.load(env=env).engine_dir == Path("/srv/engines")


def test_plain_construction_reads_no_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("INFLOW_MAX_BATCH_SIZE", "3")
    monkeypatch.chdir(tmp_path)
    Path(".inflow").mkdir()
    Path(".inflow/dev.env").write_text("INFLOW_KAFKA_BOOTSTRAP=127.0.0.1:1\n")
    settings = Settings(texts_dlq_topic="texts.dlq")
    assert settings.max_batch_size == 8 and settings.kafka_bootstrap == ""
    assert Settings.load().max_batch_size == 3  # load does read them
    assert Settings.load().kafka_bootstrap == "127.0.0.1:1"
    with pytest.raises(ConfigError, match="INFLOW_MAX_BATCH_SIZE"):
        Settings(max_batch_size=0)
    with pytest.raises(ValueError, match="frozen"):
        settings.max_batch_size = 4  # type: ignore[misc]


def test_secrets_are_strings_that_do_not_print(tmp_path: Path) -> None:
    env = {"INFLOW_STATE_DIR": str(tmp_path), "INFLOW_KAFKA_SASL_PASSWORD": "pa55"}
    settings = Settings.load(env=env)
    password = settings.kafka_sasl_password
    assert isinstance(password, Secret) and isinstance(password, str) and password == "pa55"
    assert password + "!" == "pa55!"  # usable wherever a str is (aiokafka, elasticsearch)
    assert "pa55" not in repr(settings) and "pa55" not in str(settings)
    assert settings.es_password is NO_SECRET or settings.es_password == ""


def _inflow(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("INFLOW_")}
    return subprocess.run(
        [sys.executable, "-m", "streams.cli.main", *args],
        env={**clean, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_inflow_settings_masks_secrets_and_names_sources(tmp_path: Path) -> None:
    (tmp_path / "dev.env").write_text(
        "INFLOW_KAFKA_BOOTSTRAP=127.0.0.1:1234\nINFLOW_ES_URL=http://127.0.0.1:5678\n"
    )
    env = {
        "INFLOW_STATE_DIR": str(tmp_path),
        "INFLOW_ES_URL": "http://es:9200",
        "INFLOW_ES_PASSWORD": "correct-horse-battery",
    }
    result = _inflow(env, "settings")
    assert result.returncode == 0, result.stderr
    assert "correct-horse-battery" not in result.stdout
    lines = result.stdout.splitlines()
    assert all(line.startswith("INFLOW_") for line in lines)
    assert f"INFLOW_STATE_DIR={tmp_path}  (env)" in lines
    assert f"INFLOW_KAFKA_BOOTSTRAP=127.0.0.1:1234  ({tmp_path / 'dev.env'})" in lines
    assert "INFLOW_ES_URL=http://es:9200  (env)" in lines
    assert "INFLOW_ES_PASSWORD=***  (env)" in lines
    assert "INFLOW_ES_API_KEY=  (default)" in lines  # an unset secret shows empty
    assert "INFLOW_MAX_BATCH_SIZE=8  (default)" in lines
    assert "INFLOW_ES_VERIFY_CERTS=true  (default)" in lines
    assert len(lines) == len(Settings.model_fields) - 1  # all but `extra`

    listed = json.loads(_inflow(env, "settings", "--json").stdout)
    rows = {row["name"]: row for row in listed}
    assert rows["INFLOW_ES_PASSWORD"] == {
        "name": "INFLOW_ES_PASSWORD",
        "value": "***",
        "source": "env",
    }
    assert rows["INFLOW_MAX_BATCH_SIZE"]["value"] == 8
    assert rows["INFLOW_ES_URL"]["source"] == "env"
    assert rows["INFLOW_KAFKA_BOOTSTRAP"]["source"] == str(tmp_path / "dev.env")
    assert "correct-horse-battery" not in json.dumps(listed)


def test_inflow_settings_refuses_a_bad_value_in_one_line(tmp_path: Path) -> None:
    result = _inflow({"INFLOW_STATE_DIR": str(tmp_path), "INFLOW_WEB_PORT": "70000"}, "settings")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        "inflow: error: INFLOW_WEB_PORT must be a TCP port (0-65535), got '70000'\n"
    )


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
