"""Settings in which every declared parameter differs from its default."""
from lib_unetmods import Settings
from lib_unetmods.params import ParamError
from lib_unetmods.techniques import SPECS

TEXT_CANDIDATES = ("1,2", "5,-5,-5", "2|1,1", "1", "input.4,middle")


def _other_text(param):
    for text in TEXT_CANDIDATES:
        try:
            if param.coerce(text) != param.default:
                return param.coerce(text)
        except ParamError:
            continue
    raise AssertionError(f"no example text for {param.name}")


def every_param_changed() -> Settings:
    settings = Settings()
    for tid, spec in SPECS.items():
        for param in spec.params:
            if param.kind == "bool":
                value = not param.default
            elif param.kind == "choice":
                value = next(c for c in param.choices if c != param.default)
            elif param.kind == "text":
                value = _other_text(param)
            else:
                span = param.maximum - param.minimum
                value = param.minimum + (span / 3 if param.kind == "float" else max(1, int(span // 3)))
                value = value if value != param.default else param.maximum
                value = int(value) if param.kind == "int" else value
            settings[tid][param.name] = value
        settings[tid]["enabled"] = True
    return settings
