"""Serving: an HTTP restoration API (``codeformer-serve``, LitServe) and a web demo (``codeformer-demo``,
Gradio). Install with the ``[serve]`` / ``[demo]`` extras; the rest of the package never imports this."""
