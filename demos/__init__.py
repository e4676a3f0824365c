"""vtoken's demos. ``demos/app.py`` is the Gradio side-by-side demo (``vtoken demo``)."""
