"""Settings: defaults, the Orthanc section, CBIR_ variables and flags, strongest last."""

from __future__ import annotations

import pytest

from orthanc_cbir.config import Settings, load_settings


def test_defaults_apply_when_nothing_is_set():
    assert load_settings(env={}) == Settings()
    assert Settings().redis_url == "redis://127.0.0.1:6379/0"


def test_environment_beats_orthanc_section_and_flags_beat_both():
    section = {"RedisUrl": "redis://section:1/0", "FramesPerInstance": 2}
    env = {"CBIR_REDIS_URL": "redis://env:2/0"}
    assert load_settings(section, env).redis_url == "redis://env:2/0"
    assert load_settings(section, env).frames_per_instance == 2
    assert load_settings(section, env, redis_url="redis://flag:3/0").redis_url == "redis://flag:3/0"
    assert load_settings(section, env, redis_url=None).redis_url == "redis://env:2/0"


def test_values_are_converted_to_the_field_type():
    assert load_settings(env={"CBIR_FRAMES_PER_INSTANCE": " 4 "}).frames_per_instance == 4


@pytest.mark.parametrize(
    ("section", "env", "message"),
    [
        ({"RedisHost": "x"}, {}, "unknown setting 'RedisHost'"),
        ({}, {"CBIR_FRAMES_PER_INSTANCE": "many"}, "frames_per_instance must be int"),
    ],
)
def test_bad_settings_are_refused_with_the_name(section, env, message):
    with pytest.raises(ValueError, match=message):
        load_settings(section, env)
