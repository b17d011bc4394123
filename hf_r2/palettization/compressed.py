"""Former home of the palettized format, layers and helpers; kept so that existing imports keep working.

Every name it held is looked up in the module that now owns it: the on-disk format (`hf_r2.palettization.format`),
the compact layers (`hf_r2.palettization.palettized_layers`), the checkpoint config and `attach_palettization_config`
(`hf_r2.palettization.config`) and `unpalettize` (`hf_r2.palettization.model`).
"""

import importlib

_NEW_HOMES = ("format", "palettized_layers", "config", "model")


def __getattr__(name: str):
    for home in _NEW_HOMES:
        module = importlib.import_module(f"hf_r2.palettization.{home}")
        if name in module.__all__:
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
