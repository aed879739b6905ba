"""Pyro models from the classic VI/VAE lectures, one module each (``models.<name>``).

Every module exposes ``model(<observed>=None, ...)``: passing ``None`` for the observed value draws it from the
model, so each model can simulate its own data; ``simulate(...)`` returns such a draw reproducibly.
"""
