"""The token-object index that C_FindObjects uses (core/model.py Slot)."""

from __future__ import annotations

from keygridd.core.model import Obj, Peer, Slot
from keygridd.core.store import Attributes
from keygridd.pkcs11 import CKA, CKK, CKO
from keygridd.providers.memory import MemoryOptions, MemoryStore


def make_slot() -> Slot:
    store = MemoryStore(MemoryOptions(), 0)
    return Slot(0, "test", "memory", store, {}, lambda peer: True)


def key(label: bytes, kid: bytes, cls: int = CKO.PRIVATE_KEY) -> Attributes:
    return {CKA.CLASS: cls, CKA.KEY_TYPE: CKK.EC, CKA.LABEL: label, CKA.ID: kid}


def test_candidates_use_the_smallest_index_entry() -> None:
    slot = make_slot()
    for i in range(1000):
        slot.add(Obj(bytes([i % 256, i // 256]), key(b"label-%d" % i, b"id"), 0, None))
    found = list(slot.candidates([(CKA.CLASS, CKO.PRIVATE_KEY), (CKA.LABEL, b"label-7")]))
    assert [o.attrs[CKA.LABEL] for o in found] == [b"label-7"]
    assert len(list(slot.candidates([(CKA.ID, b"id")]))) == 1000
    assert list(slot.candidates([(CKA.LABEL, b"nobody")])) == []
    assert len(list(slot.candidates([(CKA.VALUE, b"x")]))) == 1000  # not indexed: every object


def test_index_follows_updates_and_removals() -> None:
    slot = make_slot()
    obj = Obj(b"a", key(b"old", b"1"), 0, None)
    slot.add(obj)
    slot.update(obj, key(b"new", b"1"))
    assert list(slot.candidates([(CKA.LABEL, b"old")])) == []
    assert list(slot.candidates([(CKA.LABEL, b"new")])) == [obj]
    slot.remove(obj)
    assert obj.destroyed and list(slot.candidates([(CKA.LABEL, b"new")])) == []
    assert slot.index == {}


def test_apply_takes_changes_of_other_writers() -> None:
    slot = make_slot()
    slot.apply(b"x", key(b"made elsewhere", b"2"))
    (obj,) = slot.candidates([(CKA.LABEL, b"made elsewhere")])
    slot.apply(b"x", key(b"renamed elsewhere", b"2"))
    assert obj.attrs[CKA.LABEL] == b"renamed elsewhere" and not obj.destroyed
    slot.apply(b"x", None)
    assert obj.destroyed and b"x" not in slot.objects


def test_unhashable_template_values_match_nothing_in_the_index() -> None:
    slot = make_slot()
    slot.add(Obj(b"a", key(b"l", b"1"), 0, None))
    assert list(slot.candidates([(CKA.LABEL, [1, 2])])) == []  # type: ignore[list-item]


def test_peer_is_hashable_for_access_checks() -> None:
    assert hash(Peer(1, 2, 3)) == hash(Peer(1, 2, 3))
