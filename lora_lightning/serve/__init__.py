"""An adapter server on LitServe: one base model, many adapters, a different adapter per
request, batched (``python -m lora_lightning.serve --help``; README, "Serving adapters").

App layer: the core never imports this package (nor LitServe). ``engine`` holds the model
and answers batches (no LitServe); ``server`` is the HTTP side.
"""
