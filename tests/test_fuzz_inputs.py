"""Fuzzing of every text and API entry point with hypothesis: the canonical text (--mods), the
infotext (Settings.from_infotext and the script's paste-back fields), the API dict, the
positional script args, XYZ cell values and the script's process() itself.

Two kinds of property, written against the declarations, not against message wording:
- garbage anywhere: nothing raises past the boundary, every resulting value is one its
  declaration accepts;
- one bad value in otherwise valid settings: it is reported, every message names the parameter
  (its name or label, and its technique's id or title), the parameter ends up with a valid
  value and every other parameter keeps its value.
"""
import contextlib
import io
import math
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from lib_unetmods.lab import soak_runner  # noqa: E402  (puts the WebUI stand-in on sys.path)
from lib_unetmods import Settings, SettingsError
from lib_unetmods.host import STATE_ATTR, settings_from
from lib_unetmods.params import ParamError
from lib_unetmods.settings import arg_layout
from lib_unetmods.techniques import SPECS
from lib_unetmods.ui import labels
from modules import infotext_utils, processing, scripts

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
PARAMS = [(spec, param) for spec in SPECS.values() for param in spec.params]
LABELS = labels()


# --- strategies --------------------------------------------------------------------------

def rejects(param, value) -> bool:
    try:
        param.coerce(value)
    except ParamError:
        return True
    return False


def valid_value(param):
    if param.kind == "bool":
        return st.booleans()
    if param.kind == "choice":
        return st.sampled_from(param.choices)
    if param.kind == "text":
        return st.from_regex(param.pattern or r"[^\s;=]*", fullmatch=True).filter(lambda t: not rejects(param, t)).map(param.coerce)
    if param.kind == "int":
        return st.integers(int(param.minimum), int(param.maximum))
    return st.floats(param.minimum, param.maximum, allow_nan=False)


def bad_value(param):
    """Python values of any type the declaration refuses."""
    numbers = st.one_of(st.floats(), st.integers(), st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e-320, 10**400, -(10**400)]))
    return st.one_of(
        numbers, st.booleans(), st.none(), st.text(max_size=12), numbers.map(repr),
        st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=1),
    ).filter(lambda v: rejects(param, v))


def bad_token(param):
    """A value as text in the canonical form: one token, no whitespace or ';'."""
    return st.one_of(bad_value(param).map(str), st.text(min_size=1, max_size=12)).filter(
        lambda t: t and not any(c.isspace() or c == ";" for c in t) and rejects(param, t))


@st.composite
def valid_settings(draw, must=None):
    tids = set(draw(st.sets(st.sampled_from(list(SPECS)), max_size=3)))
    if must is not None:
        tids.add(must)
    out = Settings()
    for tid in tids:
        for param in SPECS[tid].params[1:]:
            if draw(st.booleans()):
                out[tid][param.name] = draw(valid_value(param))
        out[tid]["enabled"] = True
    return out


@st.composite
def one_fault(draw, value_strategy):
    """(valid settings, spec, param, bad value) with the param's technique enabled."""
    spec, param = draw(st.sampled_from(PARAMS))
    return draw(valid_settings(must=spec.id)), spec, param, draw(value_strategy(param))


anything = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8)
# text shaped like ours, with real technique and parameter names among the noise
word = st.one_of(st.sampled_from(list(SPECS)), st.sampled_from([p.name for _, p in PARAMS]), st.text(max_size=8))
mods_text = st.lists(st.one_of(word, st.sampled_from([" ", "=", ";", "; ", ",", "|", "default", "preset="])),
                     max_size=20).map("".join)


# --- checks ------------------------------------------------------------------------------

def assert_all_valid(result: Settings) -> None:
    for spec in SPECS.values():
        for param in spec.params:
            value = result[spec.id][param.name]
            assert param.coerce(value) == value, (spec.id, param.name, value)


def names_the_parameter(message: str, spec, param) -> bool:
    text = message.lower()
    return (param.name.lower() in text or LABELS[(spec.id, param.name)].lower() in text) and (
        spec.id.lower() in text or spec.title.lower() in text)


def assert_one_fault_reported(result: Settings, before: Settings, spec, param, messages=None) -> None:
    messages = result.errors if messages is None else messages
    assert messages, f"{spec.id}.{param.name}: a bad value was accepted silently"
    for message in messages:
        assert names_the_parameter(message, spec, param), f"{message!r} does not name {spec.id}.{param.name}"
    assert_all_valid(result)
    for tid, values in before.values.items():
        for name, value in values.items():
            if (tid, name) != (spec.id, param.name):
                assert result[tid][name] == value, f"{tid}.{name} lost its value because of {spec.id}.{param.name}"


def with_token(text: str, tid: str, token: str) -> str:
    """`text` (canonical form) with `token` added to technique `tid`'s part."""
    parts = [part if part.split(" ", 1)[0] != tid else f"{part} {token}" for part in text.split("; ")]
    return "; ".join(parts)


# --- the canonical text (--mods, the infotext values) ------------------------------------

@FUZZ
@given(mods_text)
def test_text_garbage_never_raises(text):
    result = Settings.from_text(text)
    assert_all_valid(result)
    assert all(isinstance(e, str) and e for e in result.errors)
    try:
        strict = Settings.from_text(text, strict=True)
    except SettingsError as e:
        assert result.errors and str(e)
    else:
        assert strict == result and not result.errors


@FUZZ
@given(one_fault(bad_token))
def test_text_one_bad_value_names_it(case):
    before, spec, param, token = case
    result = Settings.from_text(with_token(before.to_text(), spec.id, f"{param.name}={token}"))
    assert_one_fault_reported(result, before, spec, param)


@FUZZ
@given(valid_settings())
def test_text_round_trip(before):
    assert Settings.from_text(before.to_text(), strict=True) == before


# --- infotext: Settings.from_infotext and the script's paste-back ------------------------

infotext_keys = st.one_of(st.sampled_from([spec.infotext_key for spec in SPECS.values()]), st.text(max_size=12),
                          st.sampled_from([s.infotext_key.replace(" v", " v9") for s in SPECS.values()]))


@FUZZ
@given(st.dictionaries(infotext_keys, st.one_of(mods_text, anything), max_size=6))
def test_infotext_garbage_never_raises(params):
    assert_all_valid(Settings.from_infotext(params))


@FUZZ
@given(one_fault(bad_token), st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))
def test_infotext_one_bad_value_names_it(case, others):
    before, spec, param, token = case
    params = {**{k: v for k, v in others.items() if not k.startswith("UNetMods")}, **before.infotext()}
    params[spec.infotext_key] = f"{params[spec.infotext_key]} {param.name}={token}"
    assert_one_fault_reported(Settings.from_infotext(params), before, spec, param)


@pytest.fixture(scope="module")
def pasting():
    """The script's infotext_fields as the WebUI reads them after ui(): (component, key)."""
    runner = scripts.ScriptRunner([soak_runner.script_module().UNetModsScript()])
    inputs = runner.setup_ui(False)
    script = runner.alwayson_scripts[0]
    controls = dict(zip(inputs[script.args_from:script.args_to], arg_layout()))
    return script, controls


def paste(script, params):
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        pasted = infotext_utils.paste(script.infotext_fields, params)
    return pasted, log.getvalue()


@FUZZ
@given(st.dictionaries(infotext_keys, st.one_of(mods_text, anything), max_size=6))
def test_paste_garbage_never_raises(pasting, params):
    script, controls = pasting
    pasted, _ = paste(script, params)
    for component, value in pasted.items():
        tid, name = controls[component]
        param = SPECS[tid].param(name)
        assert param.coerce(value) == value, (tid, name, value)


@FUZZ
@given(one_fault(bad_token))
def test_paste_one_bad_value_names_it(pasting, case):
    before, spec, param, token = case
    script, controls = pasting
    params = before.infotext()
    params[spec.infotext_key] = f"{params[spec.infotext_key]} {param.name}={token}"
    pasted, log = paste(script, params)
    result = Settings(before.values)
    for component, value in pasted.items():
        result[controls[component][0]][controls[component][1]] = value
    messages = [line for line in log.splitlines() if line.strip()]
    assert_one_fault_reported(result, before, spec, param, messages)


@FUZZ
@given(valid_settings(), st.sampled_from(list(SPECS)), st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True),
       st.from_regex(r"[^\s;]{1,8}", fullmatch=True))
def test_unknown_parameter_is_named(before, tid, name, raw):
    """An unknown parameter name in the text, the infotext or the API dict is reported by name."""
    assume(name not in {p.name for p in SPECS[tid].params} and name != "preset")
    before[tid]["enabled"] = True
    text = with_token(before.to_text(), tid, f"{name}={raw}")
    data = {t: dict(before[t]) for t in before.enabled_ids()}
    data[tid][name] = raw
    infotext = before.infotext()
    infotext[SPECS[tid].infotext_key] += f" {name}={raw}"
    for result in (Settings.from_text(text), Settings.from_infotext(infotext), Settings.from_args([data])):
        assert result == before and result.errors
        assert all(name.lower() in e.lower() and (tid in e or SPECS[tid].title in e) for e in result.errors), result.errors


# --- API dict and positional args --------------------------------------------------------

@FUZZ
@given(st.one_of(st.dictionaries(st.one_of(st.sampled_from(list(SPECS)), st.text(max_size=6)),
                                 st.one_of(st.dictionaries(word, anything, max_size=4), anything), max_size=4), anything))
def test_api_dict_garbage_never_raises(data):
    result = Settings.from_args([data])
    assert_all_valid(result)


@FUZZ
@given(st.lists(anything, max_size=len(arg_layout()) + 3))
def test_positional_garbage_never_raises(args):
    result = Settings.from_args(args)
    assert_all_valid(result)


@FUZZ
@given(one_fault(bad_value))
def test_api_dict_one_bad_value_names_it(case):
    before, spec, param, value = case
    data = {tid: dict(before[tid]) for tid in before.enabled_ids()}
    data[spec.id][param.name] = value
    assert_one_fault_reported(Settings.from_args([data]), before, spec, param)


@FUZZ
@given(one_fault(bad_value))
def test_positional_one_bad_value_names_it(case):
    before, spec, param, value = case
    args = before.to_args()
    index = arg_layout().index((spec.id, param.name))
    args[index] = value
    result = Settings.from_args(args)
    if index == 0:  # where the API puts its dict: a bad value there may be read as a malformed payload
        assert result.errors and all(e for e in result.errors)
        assert_all_valid(result)
    else:
        assert_one_fault_reported(result, before, spec, param)


def test_an_int_beyond_float_range_is_a_bad_value_not_a_crash():
    """Found by the fuzzing: float(10**400) raises OverflowError, which escaped Param.coerce."""
    result = Settings.from_args([{"tome": {"ratio": 10**400, "sx": -(10**400)}}])
    assert result["tome"]["enabled"] and len(result.errors) == 2
    tome = SPECS["tome"]
    assert names_the_parameter(result.errors[0], tome, tome.param("ratio"))
    assert names_the_parameter(result.errors[1], tome, tome.param("sx"))


# --- XYZ cells ---------------------------------------------------------------------------

AXES = [(axis, tid, name) for (tid, name), axis in soak_runner.xyz_axes().items()]


@FUZZ
@given(st.sampled_from(AXES), st.one_of(st.text(max_size=10), st.floats().map(repr), st.integers().map(str)), valid_settings())
def test_xyz_cell_is_refused_naming_the_parameter_or_applied_exactly(axis_case, raw, before):
    axis, tid, name = axis_case
    try:
        value = axis["type"](raw)
    except (ValueError, TypeError, OverflowError):
        return  # the grid's own conversion refuses it before any of our code runs
    p = SimpleNamespace()
    if name == "preset":
        axis["apply"](p, value, [value])
        result = settings_from(p, before.to_args())
        assert_all_valid(result)
        assert all("preset" in e and tid in e for e in result.errors)
        return
    spec, param = SPECS[tid], SPECS[tid].param(name)
    try:
        axis["confirm"](p, [value])
    except Exception as e:  # the grid shows it and runs nothing
        assert names_the_parameter(str(e), spec, param), f"{e} does not name {tid}.{name}"
        assert rejects(param, value)
        return
    axis["apply"](p, value, [value])
    result = settings_from(p, before.to_args())
    assert not result.errors
    assert result[tid][name] == param.coerce(value)


# --- the script's process(): what the WebUI calls with the UI's or the API's values ------

@FUZZ
@given(st.one_of(st.lists(anything, max_size=len(arg_layout()) + 2),
                 st.tuples(st.dictionaries(st.sampled_from(list(SPECS)), st.dictionaries(word, anything, max_size=3), max_size=3)).map(list)))
def test_script_process_never_raises(pasting, args):
    script, _ = pasting
    p = processing.StableDiffusionProcessingTxt2Img(None, None, [None, *args])
    with contextlib.redirect_stdout(io.StringIO()):
        script.process(p, *args)
        script.process_before_every_sampling(p, *args)
        script.postprocess(p, None, *args)
    generation = getattr(p, STATE_ATTR)
    assert_all_valid(generation.settings)
    assert len(p.comments) >= len(set(generation.settings.errors))
    assert not soak_runner.infotext_problems(generation.settings, p.extra_generation_params)
