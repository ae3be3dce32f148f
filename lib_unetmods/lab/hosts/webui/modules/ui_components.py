from functools import wraps

import gradio as gr


class InputAccordion(gr.Checkbox):
    """A1111's / Forge's InputAccordion as a script sees it: a checkbox (the script's input, with
    the elem_id `<id>-checkbox`) and an accordion `<id>` holding the controls. The WebUI hides
    the checkbox and draws it into the accordion's header with its own javascript; this stand-in
    leaves it visible, just before its accordion. Works with the gradio stand-in and real gradio."""

    @wraps(gr.Checkbox.__init__)  # gradio 4 builds the config from the signature (as Forge does)
    def __init__(self, value=None, **kwargs):
        self.accordion_id = kwargs.get("elem_id")
        super().__init__(value=value, **{**kwargs, "elem_id": f"{self.accordion_id}-checkbox"})
        self.accordion = gr.Accordion(label=kwargs.get("label"), open=False, elem_id=self.accordion_id)

    def __enter__(self):
        self.accordion.__enter__()
        return self

    def __exit__(self, *exc):
        return self.accordion.__exit__(*exc)

    def get_block_name(self):
        return "checkbox"
