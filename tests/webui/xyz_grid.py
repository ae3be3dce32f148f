"""Stand-in for scripts/xyz_grid.py: AxisOption, axis_options, and a cell runner that
shallow-copies p and applies the axis value just before processing, as the real grid does."""
from copy import copy


class AxisOption:
    def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label, self.type, self.apply = label, type, apply
        self.confirm, self.cost, self.choices = confirm, cost, choices


axis_options: list[AxisOption] = []


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
