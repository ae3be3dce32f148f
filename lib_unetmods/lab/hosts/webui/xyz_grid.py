"""Stand-in for scripts/xyz_grid.py, loaded as a WebUI script (module name "xyz_grid.py"):
AxisOption, axis_options, the script whose ui() takes its axis list from axis_options as the
real one does (so axes added after its ui() never reach it), and a cell runner that
shallow-copies p and applies the axis value just before processing, as the real grid does."""
from copy import copy

from modules import scripts


class AxisOption:
    def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label, self.type, self.apply = label, type, apply
        self.confirm, self.cost, self.choices = confirm, cost, choices


axis_options: list[AxisOption] = []


class Script(scripts.Script):
    def title(self):
        return "X/Y/Z plot"

    def show(self, is_img2img):
        return True  # a selectable script, not AlwaysVisible

    def ui(self, is_img2img):
        self.current_axis_options = list(axis_options)  # the X/Y/Z type dropdowns' choices
        return []


def run_cells(p, axis, values, process_images):
    values = [axis.type(v) for v in values]
    if axis.confirm:
        axis.confirm(p, values)
    results = []
    for value in values:
        pc = copy(p)
        axis.apply(pc, value, values)
        results.append(process_images(pc))
    return results
