"""Stand-in for modules.infotext_utils: the WebUI's parse of the parameters line and its paste
coercion by the component's value type."""
import json
import re

re_param = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def parse_generation_parameters(line):
    return {k: unquote(v) for k, v in re_param.findall(line)}


def paste(infotext_fields, params):
    """component -> new value, or no entry where the paste leaves the component alone."""
    out = {}
    for component, key in infotext_fields:
        v = key(params) if callable(key) else params.get(key)
        if v is None:
            continue
        valtype = type(component.value)
        try:
            if valtype == bool and v == "False":
                val = False
            elif valtype == int:
                val = float(v)
            else:
                val = valtype(v)
        except Exception:
            continue
        out[component] = val
    return out


def send_to(source_fields, target_fields, paste_field_names):
    """"Send to txt2img/img2img" (connect_paste_params_buttons): the fields of both tabs whose
    infotext target is in paste_field_names, paired in order (Prompt, Steps... left out here)."""
    inputs = [field for field, name in source_fields if name in paste_field_names]
    outputs = [field for field, name in target_fields if name in paste_field_names]
    return inputs, outputs
