"""Objects, attributes, visibility and search (PKCS#11 v2.40 Base 4, 5.7, 5.8)."""

from __future__ import annotations

from typing import Any

from keygridd.client import Client
from keygridd.pkcs11 import CKA, CKK, CKM, CKO, CKR, CKU
from keygridd.pkcs11.params import Mechanism
from tests.conformance.conftest import RO, RW, ckr

P256 = bytes.fromhex("06082a8648ce3d030107")


def data_object(label: bytes, **extra: Any) -> dict[int, Any]:
    template: dict[int, Any] = {CKA.CLASS: CKO.DATA, CKA.LABEL: label, CKA.VALUE: b"payload"}
    template.update({getattr(CKA, k): v for k, v in extra.items()})
    return template


def find(p11: Any, session: int, template: dict[int, Any]) -> list[int]:
    p11.C_FindObjectsInit(session, template)
    try:
        return list(p11.C_FindObjects(session, 1000))
    finally:
        p11.C_FindObjectsFinal(session)


def test_create_read_and_destroy(p11: Any, session: int) -> None:
    h = p11.C_CreateObject(session, data_object(b"obj-1"))
    assert p11.C_GetAttributeValue(session, h, [CKA.CLASS, CKA.LABEL, CKA.VALUE, CKA.TOKEN, CKA.PRIVATE]) == [
        CKO.DATA,
        b"obj-1",
        b"payload",
        False,
        False,
    ]
    assert p11.C_GetObjectSize(session, h) > 0
    p11.C_DestroyObject(session, h)
    with ckr(CKR.OBJECT_HANDLE_INVALID):
        p11.C_GetAttributeValue(session, h, [CKA.LABEL])


def test_template_errors(p11: Any, session: int) -> None:
    with ckr(CKR.TEMPLATE_INCOMPLETE):
        p11.C_CreateObject(session, {CKA.LABEL: b"no class"})
    with ckr(CKR.ATTRIBUTE_TYPE_INVALID):
        p11.C_CreateObject(session, {CKA.CLASS: CKO.DATA, CKA.MODULUS: b"\x01"})
    with ckr(CKR.ATTRIBUTE_READ_ONLY):
        p11.C_CreateObject(
            session, {CKA.CLASS: CKO.SECRET_KEY, CKA.KEY_TYPE: CKK.AES, CKA.VALUE: b"k" * 16, CKA.LOCAL: True}
        )
    with ckr(CKR.ATTRIBUTE_VALUE_INVALID):
        p11.C_CreateObject(session, {CKA.CLASS: CKO.DATA, CKA.TOKEN: b"yes"})
    with ckr(CKR.TEMPLATE_INCOMPLETE):
        p11.C_CreateObject(session, {CKA.CLASS: CKO.SECRET_KEY, CKA.VALUE: b"k" * 16})
    with ckr(CKR.TEMPLATE_INCONSISTENT):
        p11.C_CreateObject(session, {CKA.CLASS: CKO.SECRET_KEY, CKA.KEY_TYPE: CKK.RSA, CKA.VALUE: b"k" * 16})
    with ckr(CKR.ATTRIBUTE_VALUE_INVALID):
        p11.C_CreateObject(session, {CKA.CLASS: 0x7777})


def test_get_attribute_value_marks_what_it_cannot_return(p11: Any, session: int) -> None:
    key = p11.C_CreateObject(
        session,
        {CKA.CLASS: CKO.SECRET_KEY, CKA.KEY_TYPE: CKK.AES, CKA.VALUE: b"k" * 32, CKA.SENSITIVE: True, CKA.LABEL: b"s"},
    )
    values = p11.C_GetAttributeValue(session, key, [CKA.LABEL, CKA.VALUE, CKA.MODULUS, CKA.VALUE_LEN])
    assert values == [b"s", None, None, 32]


def test_set_attribute_rules(p11: Any, session: int) -> None:
    key = p11.C_CreateObject(
        session,
        {CKA.CLASS: CKO.SECRET_KEY, CKA.KEY_TYPE: CKK.AES, CKA.VALUE: b"k" * 16, CKA.SENSITIVE: False,
         CKA.EXTRACTABLE: True},
    )  # fmt: skip
    p11.C_SetAttributeValue(session, key, {CKA.LABEL: b"renamed", CKA.ID: b"\x01\x02"})
    assert p11.C_GetAttributeValue(session, key, [CKA.LABEL, CKA.ID]) == [b"renamed", b"\x01\x02"]
    with ckr(CKR.ATTRIBUTE_READ_ONLY):
        p11.C_SetAttributeValue(session, key, {CKA.KEY_TYPE: CKK.GENERIC_SECRET})
    with ckr(CKR.ATTRIBUTE_READ_ONLY):
        p11.C_SetAttributeValue(session, key, {CKA.VALUE: b"x" * 16})
    p11.C_SetAttributeValue(session, key, {CKA.SENSITIVE: True})
    with ckr(CKR.ATTRIBUTE_READ_ONLY):
        p11.C_SetAttributeValue(session, key, {CKA.SENSITIVE: False})  # sticky once true
    p11.C_SetAttributeValue(session, key, {CKA.EXTRACTABLE: False})
    with ckr(CKR.ATTRIBUTE_READ_ONLY):
        p11.C_SetAttributeValue(session, key, {CKA.EXTRACTABLE: True})  # sticky once false
    attrs = p11.C_GetAttributeValue(session, key, [CKA.ALWAYS_SENSITIVE, CKA.NEVER_EXTRACTABLE, CKA.LOCAL])
    assert attrs == [False, False, False]  # imported: neither always sensitive nor never extractable
    with ckr(CKR.ATTRIBUTE_TYPE_INVALID):
        p11.C_SetAttributeValue(session, key, {CKA.MODULUS: b"\x01"})


def test_modifiable_copyable_destroyable(p11: Any, session: int) -> None:
    frozen = p11.C_CreateObject(session, data_object(b"frozen", MODIFIABLE=False))
    with ckr(CKR.ACTION_PROHIBITED):
        p11.C_SetAttributeValue(session, frozen, {CKA.LABEL: b"x"})
    fixed = p11.C_CreateObject(session, data_object(b"fixed", COPYABLE=False))
    with ckr(CKR.ACTION_PROHIBITED):
        p11.C_CopyObject(session, fixed, {})
    kept = p11.C_CreateObject(session, data_object(b"kept", DESTROYABLE=False))
    with ckr(CKR.ACTION_PROHIBITED):
        p11.C_DestroyObject(session, kept)


def test_copy_object(p11: Any, session: int) -> None:
    original = p11.C_CreateObject(session, data_object(b"orig"))
    copy = p11.C_CopyObject(session, original, {CKA.LABEL: b"copy", CKA.PRIVATE: True})
    assert copy != original
    assert p11.C_GetAttributeValue(session, copy, [CKA.LABEL, CKA.VALUE, CKA.PRIVATE]) == [b"copy", b"payload", True]
    assert p11.C_GetAttributeValue(session, original, [CKA.LABEL]) == [b"orig"]
    with ckr(CKR.ATTRIBUTE_READ_ONLY):
        p11.C_CopyObject(session, original, {CKA.CLASS: CKO.CERTIFICATE})


def test_private_objects_need_login(p11: Any, daemon: Any) -> None:
    s = p11.C_OpenSession(0, RW)
    with ckr(CKR.USER_NOT_LOGGED_IN):
        p11.C_CreateObject(s, data_object(b"secret", PRIVATE=True))
    p11.C_Login(s, CKU.USER, daemon.user_pin)
    private = p11.C_CreateObject(s, data_object(b"vis-private", PRIVATE=True))
    public = p11.C_CreateObject(s, data_object(b"vis-public", PRIVATE=False))
    assert find(p11, s, {CKA.LABEL: b"vis-private"}) == [private]
    p11.C_Logout(s)
    # The private session object is destroyed and its handle invalid (Base 5.6, C_Logout).
    assert find(p11, s, {CKA.LABEL: b"vis-private"}) == []
    assert find(p11, s, {CKA.LABEL: b"vis-public"}) == [public]
    with ckr(CKR.OBJECT_HANDLE_INVALID):
        p11.C_GetAttributeValue(s, private, [CKA.LABEL])


def test_token_private_object_visibility(p11: Any, other: Client, daemon: Any) -> None:
    s = p11.C_OpenSession(0, RW)
    p11.C_Login(s, CKU.USER, daemon.user_pin)
    h = p11.C_CreateObject(s, data_object(b"tok-private", PRIVATE=True, TOKEN=True))
    try:
        theirs = other.C_OpenSession(0, RO)
        assert find(other, theirs, {CKA.LABEL: b"tok-private"}) == []  # not logged in there
        other.C_Login(theirs, CKU.USER, daemon.user_pin)
        found = find(other, theirs, {CKA.LABEL: b"tok-private"})
        assert len(found) == 1
    finally:
        p11.C_DestroyObject(s, h)
    assert find(other, theirs, {CKA.LABEL: b"tok-private"}) == []


def test_read_only_session_cannot_write_token_objects(p11: Any, daemon: Any) -> None:
    ro = p11.C_OpenSession(0, RO)
    p11.C_Login(ro, CKU.USER, daemon.user_pin)
    with ckr(CKR.SESSION_READ_ONLY):
        p11.C_CreateObject(ro, data_object(b"ro", TOKEN=True))
    session_obj = p11.C_CreateObject(ro, data_object(b"ro-session"))
    p11.C_DestroyObject(ro, session_obj)
    with ckr(CKR.SESSION_READ_ONLY):
        p11.C_GenerateKey(ro, Mechanism(CKM.AES_KEY_GEN), {CKA.VALUE_LEN: 16, CKA.TOKEN: True})


def test_session_objects_belong_to_their_session_and_application(p11: Any, other: Client, daemon: Any) -> None:
    a = p11.C_OpenSession(0, RW)
    b = p11.C_OpenSession(0, RW)
    h = p11.C_CreateObject(a, data_object(b"owned", PRIVATE=False))
    assert find(p11, b, {CKA.LABEL: b"owned"}) == [h]  # visible to every session of the application
    theirs = other.C_OpenSession(0, RW)
    assert find(other, theirs, {CKA.LABEL: b"owned"}) == []
    with ckr(CKR.OBJECT_HANDLE_INVALID):
        other.C_GetAttributeValue(theirs, h, [CKA.LABEL])
    p11.C_CloseSession(a)  # session objects die with the session that made them
    assert find(p11, b, {CKA.LABEL: b"owned"}) == []


def test_find_objects(p11: Any, session: int) -> None:
    handles = [p11.C_CreateObject(session, data_object(b"findme", APPLICATION=bytes([i]))) for i in range(5)]
    p11.C_FindObjectsInit(session, {CKA.LABEL: b"findme"})
    with ckr(CKR.OPERATION_ACTIVE):
        p11.C_FindObjectsInit(session, {})
    got = p11.C_FindObjects(session, 2) + p11.C_FindObjects(session, 2) + p11.C_FindObjects(session, 2)
    assert sorted(got) == sorted(handles)
    assert p11.C_FindObjects(session, 2) == []
    p11.C_FindObjectsFinal(session)
    with ckr(CKR.OPERATION_NOT_INITIALIZED):
        p11.C_FindObjects(session, 1)
    with ckr(CKR.OPERATION_NOT_INITIALIZED):
        p11.C_FindObjectsFinal(session)
    assert find(p11, session, {CKA.LABEL: b"findme", CKA.APPLICATION: b"\x03"}) == [handles[3]]
    assert find(p11, session, {CKA.LABEL: b"findme", CKA.CLASS: CKO.CERTIFICATE}) == []


def test_sensitive_values_never_match_a_search(p11: Any, session: int) -> None:
    value = b"v" * 16
    p11.C_CreateObject(
        session,
        {CKA.CLASS: CKO.SECRET_KEY, CKA.KEY_TYPE: CKK.AES, CKA.VALUE: value, CKA.LABEL: b"hid", CKA.SENSITIVE: True},
    )
    assert find(p11, session, {CKA.LABEL: b"hid"}) != []
    assert find(p11, session, {CKA.LABEL: b"hid", CKA.VALUE: value}) == []


def test_token_objects_survive_the_application(p11: Any, daemon: Any) -> None:
    s = p11.C_OpenSession(0, RW)
    p11.C_Login(s, CKU.USER, daemon.user_pin)
    _pub, _priv = p11.C_GenerateKeyPair(
        s, Mechanism(CKM.EC_KEY_PAIR_GEN), {CKA.EC_PARAMS: P256, CKA.TOKEN: True, CKA.LABEL: b"persist"},
        {CKA.TOKEN: True, CKA.LABEL: b"persist"},
    )  # fmt: skip
    later = Client(daemon.socket)  # another application (a module is one application per process)
    try:
        s2 = later.C_OpenSession(0, RW)
        later.C_Login(s2, CKU.USER, daemon.user_pin)
        found = find(later, s2, {CKA.LABEL: b"persist"})
        assert len(found) == 2
        for h in found:
            later.C_DestroyObject(s2, h)
    finally:
        later.close()
