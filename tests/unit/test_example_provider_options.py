"""keygrid.yaml.example documents every option of every built-in provider."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from keygridd.providers import registry
from keygridd.providers.memory import Scenario

EXAMPLE = Path(__file__).resolve().parents[2] / "keygrid.yaml.example"


def documented(text: str, key: str) -> bool:
    return re.search(rf"^\s*#?\s*-?\s*{key}:", text, flags=re.M) is not None


def test_every_provider_option_is_in_the_example() -> None:
    text = EXAMPLE.read_text()
    for name in registry.names():
        for field in dataclasses.fields(registry.load(name).options_type):
            assert documented(text, field.name), f"provider {name}: option {field.name} is not in the example"


def test_every_memory_scenario_key_is_in_the_example() -> None:
    text = EXAMPLE.read_text()
    for field in dataclasses.fields(Scenario):
        assert documented(text, field.name), f"memory scenario key {field.name} is not in the example"
