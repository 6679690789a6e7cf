"""Provider lookup by name through the entry point group ``keygrid.providers``.

A provider package declares, in its pyproject.toml::

    [project.entry-points."keygrid.providers"]
    myhsm = "mypackage.provider:MyHsmProvider"

and ``keygridd`` finds it at start; nothing in KeyGrid lists providers by hand.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from keygridd.providers.base import Provider

GROUP = "keygrid.providers"


def names() -> list[str]:
    return sorted({ep.name for ep in entry_points(group=GROUP)})


def load(name: str) -> type[Provider]:
    """The provider class registered as ``name``; KeyError if there is none."""
    for ep in entry_points(group=GROUP, name=name):
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, Provider)):
            raise TypeError(f"entry point {name!r} ({ep.value}) is not a keygridd Provider")
        return cls
    raise KeyError(name)
