"""backpack-nb: train, resume, evaluate and read Backpack language models next to a
Transformer baseline, on Europarl, from JupyterLab or the command line."""

__version__ = "0.1.0"
