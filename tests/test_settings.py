"""Declarations, validation and the canonical text form shared by infotext, API and benchmark."""
import re

import pytest

from lib_unetmods import Settings, SettingsError
from lib_unetmods.params import Param, ParamError
from lib_unetmods.settings import arg_layout
from lib_unetmods.techniques import SPECS
from settings_cases import every_param_changed

INFOTEXT_KEY = re.compile(r"\w[\w \-/]+")  # the WebUI's infotext key pattern


def test_declarations_are_complete_and_defaults_valid():
    for spec in SPECS.values():
        assert spec.params[0].name == "enabled"
        for p in spec.params:
            assert p.label and p.tooltip, (spec.id, p.name)
            assert p.coerce(p.default) == p.default, (spec.id, p.name)
            if p.kind in ("int", "float"):
                assert p.minimum is not None and p.maximum is not None, (spec.id, p.name)
        assert INFOTEXT_KEY.fullmatch(spec.infotext_key) and spec.infotext_key.startswith("UNetMods ")
        assert re.search(r" v\d+$", spec.infotext_key)


@pytest.mark.parametrize("raw,expected", [("true", True), ("OFF", False), (1, True), (0.0, False), (True, True)])
def test_bool_coercion(raw, expected):
    assert Param("x", "bool", False, "X", "t").coerce(raw) is expected


@pytest.mark.parametrize("param,raw,message", [
    (Param("b1", "float", 1.0, "B", "t", 0, 2), 2.5, "outside"),
    (Param("b1", "float", 1.0, "B", "t", 0, 2), "abc", "expected a number"),
    (Param("b1", "float", 1.0, "B", "t", 0, 2), float("nan"), "finite"),
    (Param("b1", "float", 1.0, "B", "t", 0, 2), True, "expected a number"),
    (Param("n", "int", 1, "N", "t", 0, 9), 1.5, "whole number"),
    (Param("m", "choice", "a", "M", "t", choices=("a", "b")), "c", "not one of"),
    (Param("e", "bool", False, "E", "t"), "maybe", "true or false"),
])
def test_bad_values_raise_a_message_naming_the_parameter(param, raw, message):
    with pytest.raises(ParamError, match=message) as err:
        param.coerce(raw, f"tech.{param.name}")
    assert f"tech.{param.name}" in str(err.value)


def test_int_and_choice_coercion():
    assert Param("n", "int", 1, "N", "t", 0, 9).coerce("4") == 4
    assert Param("n", "int", 1, "N", "t", 0, 9).coerce(4.0) == 4
    assert Param("m", "choice", "v1", "M", "t", choices=("v1", "v2")).coerce("V2") == "v2"


def test_text_round_trip_of_every_parameter():
    settings = every_param_changed()
    text = settings.to_text()
    assert ":" not in text and "\n" not in text  # text lists use "," and are quoted by the WebUI (see test_webui_script)
    again = Settings.from_text(text, strict=True)
    assert again == settings and again.errors == []
    assert Settings.from_infotext(settings.infotext()) == settings


def test_positional_and_api_dict_forms():
    settings = every_param_changed()
    assert Settings.from_args(settings.to_args()) == settings
    assert len(settings.to_args()) == len(arg_layout())
    api = {tid: {k: v for k, v in vals.items() if k != "enabled"} for tid, vals in settings.values.items()}
    assert Settings.from_args([api, "ignored"]) == settings
    assert Settings().update_from_dict({"freeu": {"enabled": False, "b1": 1.2}})["freeu"]["enabled"] is False


def test_errors_keep_the_other_values():
    s = Settings.from_text("freeu b1=9 s1=0.5 bogus x=1; nosuch a=1")
    assert s["freeu"]["enabled"] and s["freeu"]["s1"] == 0.5 and s["freeu"]["b1"] == SPECS["freeu"].param("b1").default
    joined = " | ".join(s.errors)
    assert "freeu.b1" in joined and "bogus" in joined and "nosuch" in joined
    with pytest.raises(SettingsError, match="freeu.b1"):
        Settings.from_text("freeu b1=9", strict=True)
    bad = Settings.from_args([{"freeu": "on"}])
    assert not bad["freeu"]["enabled"] and "expected a dict" in bad.errors[0]


def test_presets_carry_their_version():
    s = Settings.from_text("freeu preset=sd21-v1 b2=1.3", strict=True)
    assert s["freeu"]["version"] == "v1" and s["freeu"]["b1"] == 1.1 and s["freeu"]["b2"] == 1.3
    assert "freeu.preset" in Settings.from_text("freeu preset=nope").errors[0]


def test_text_of_nothing_enabled_is_empty():
    assert Settings().to_text() == "" and Settings().infotext() == {}
    assert Settings.from_text("freeu").to_text() == "freeu default"
