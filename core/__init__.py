"""The model engine: sources -> weights -> model -> generator.

Data flows one way: `sources` turns a user's model spec (demo, folder, Hub id,
GGUF file) into an HF-layout folder; `loader` reads that folder into a `Model`
plus its `Tokenizer`; `generator` drives the model; the CLIs and the web app sit
on top and never reach below the module they call.
"""
