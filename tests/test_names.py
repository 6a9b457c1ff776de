"""Names are data: one rule (edge.names.clean_name) for every surface, checked on generated hostile text."""
from __future__ import annotations

import tempfile
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from conftest import untrusted_text
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.errors import StoreError
from edge.names import FORBIDDEN_CHAR_CATEGORIES, MAX_NAME_CHARS, clean_name, name_key
from edge.store import Store

FAST = settings(max_examples=200, deadline=None)
STORE_EXAMPLES = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def visible(text: str) -> bool:
    return not any(unicodedata.category(char) in FORBIDDEN_CHAR_CATEGORIES for char in text)


@FAST
@given(untrusted_text(300))
def test_a_name_is_clean_visible_bounded_and_stable_or_refused_in_one_line(text):
    try:
        name = clean_name(text)
    except StoreError as err:
        message = str(err)
        assert len(message.splitlines()) == 1 and visible(message), message
        return
    assert visible(text), "a control, format, private or unassigned character was let through"
    assert 1 <= len(name) <= MAX_NAME_CHARS and name == name.strip() and "  " not in name
    assert name == unicodedata.normalize("NFC", name) and clean_name(name) == name
    assert not any(unicodedata.category(char) == "Zs" and char != " " for char in name)


@FAST
@given(untrusted_text(60), st.sampled_from(["\u200b", "\u200d", "\u202e", "\u2066", "\ufeff", "\u00ad", "\x1b"]),
       st.integers(0, 60))
def test_an_invisible_character_anywhere_is_refused(text, invisible, at):
    at = min(at, len(text))
    with pytest.raises(StoreError, match="U\\+"):
        clean_name(text[:at] + invisible + text[at:])


@STORE_EXAMPLES
@given(st.lists(untrusted_text(80), min_size=1, max_size=6))
def test_the_store_keeps_accepted_names_unique_ignoring_case_and_refuses_the_rest(texts):
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "people.edgestore"
        store = Store.open(path, fingerprint="test:names")
        expected: dict[str, str] = {}
        for text in texts:
            try:
                name = clean_name(text)
            except StoreError:
                with pytest.raises(StoreError), store.edit():
                    store.add_person(text, rng.standard_normal(128))
                continue
            if name_key(name) in expected:
                with pytest.raises(StoreError, match="already enrolled"), store.edit():
                    store.add_person(text.swapcase() if text.swapcase().strip() else text, rng.standard_normal(128))
                continue
            with store.edit():
                person = store.add_person(text, rng.standard_normal(128))
            assert person.name == name
            expected[name_key(name)] = person.id
        loaded = Store.open(path, fingerprint="test:names")
        assert {name_key(p.name): p.id for p in loaded.persons} == expected
        for person in loaded.persons:
            assert loaded.find(person.name).id == loaded.find(person.name.upper()).id == person.id
