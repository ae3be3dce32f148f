"""Settings in which every declared parameter differs from its default."""
from lib_unetmods import Settings
from lib_unetmods.techniques import SPECS


def every_param_changed() -> Settings:
    settings = Settings()
    for tid, spec in SPECS.items():
        for param in spec.params:
            if param.kind == "bool":
                value = not param.default
            elif param.kind == "choice":
                value = next(c for c in param.choices if c != param.default)
            else:
                span = param.maximum - param.minimum
                value = param.minimum + (span / 3 if param.kind == "float" else max(1, int(span // 3)))
                value = value if value != param.default else param.maximum
                value = int(value) if param.kind == "int" else value
            settings[tid][param.name] = value
        settings[tid]["enabled"] = True
    return settings
