import gradio as gr


class InputAccordion(gr.Checkbox):
    """A1111's InputAccordion: a checkbox (the enable flag) that is also an accordion."""

    def __init__(self, value, **kwargs):
        super().__init__(value=value, **kwargs)
        self.accordion = gr.Accordion(label=kwargs.get("label"), open=False)
