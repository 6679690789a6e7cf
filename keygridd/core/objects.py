"""Templates against the policy table: new objects, copies, changes, reads, matches.

Each function implements one paragraph of PKCS#11 v2.40 Base 5.7 (object
management) and returns attributes or raises the code the spec names:
CKR_TEMPLATE_INCOMPLETE, _INCONSISTENT, CKR_ATTRIBUTE_TYPE_INVALID,
_VALUE_INVALID, _READ_ONLY, _SENSITIVE, CKR_ACTION_PROHIBITED.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from enum import Enum

from keygridd.core import policy
from keygridd.core.policy import F
from keygridd.core.store import Attributes
from keygridd.pkcs11 import CKA, CKO
from keygridd.pkcs11.attributes import AttrValue
from keygridd.pkcs11.errors import (
    ActionProhibited,
    AttributeReadOnly,
    AttributeTypeInvalid,
    AttributeValueInvalid,
    TemplateIncomplete,
    TemplateInconsistent,
)

Template = Sequence[tuple[int, AttrValue]]


class Origin(Enum):
    CREATE = (F.REQ_CREATE, F.NO_CREATE)
    GENERATE = (F.REQ_GEN, F.NO_GEN)
    UNWRAP = (F.REQ_UNWRAP, F.NO_UNWRAP)
    DERIVE = (F(0), F.NO_GEN)


def as_dict(template: Template) -> Attributes:
    return dict(template)


def class_and_type(attrs: Mapping[int, AttrValue], default_cls: int | None = None) -> tuple[int, int | None]:
    cls = attrs.get(CKA.CLASS, default_cls)
    if cls is None:
        raise TemplateIncomplete("CKA_CLASS is missing")
    if not isinstance(cls, int) or isinstance(cls, bool) or not policy.known_class(cls):
        raise AttributeValueInvalid("CKA_CLASS names a class this token does not hold")
    key_type = attrs.get(CKA.KEY_TYPE)
    if key_type is not None and not isinstance(key_type, int):
        raise AttributeValueInvalid("CKA_KEY_TYPE")
    if cls in (CKO.PUBLIC_KEY, CKO.PRIVATE_KEY, CKO.SECRET_KEY):
        if key_type is None:
            raise TemplateIncomplete("CKA_KEY_TYPE is missing")
        if not policy.known_key_type(cls, key_type):
            raise TemplateInconsistent("CKA_KEY_TYPE is not one this token holds for the class")
    return cls, key_type


def build(
    template: Template,
    origin: Origin,
    *,
    generated: Mapping[int, AttrValue] | None = None,
    default_cls: int | None = None,
    is_so: bool = False,
) -> Attributes:
    """A new object's attributes from the caller's template plus token-made values.

    ``generated`` holds what the token computed (key material, CKA_CLASS and
    CKA_KEY_TYPE of generated keys); the template may not contradict it.
    """
    given = as_dict(template)
    made = dict(generated or {})
    for fixed in (CKA.CLASS, CKA.KEY_TYPE):
        if fixed in made and fixed in given and given[fixed] != made[fixed]:
            raise TemplateInconsistent(f"{fixed} contradicts the mechanism")
    cls, key_type = class_and_type({**given, **made}, default_cls)
    rules = policy.rules(cls, key_type)
    required, forbidden = origin.value
    for attr, value in given.items():
        rule = rules.get(attr)
        if rule is None:
            raise AttributeTypeInvalid(f"{_name(attr)} is not an attribute of this object class")
        if rule.flags & forbidden and attr not in (CKA.CLASS, CKA.KEY_TYPE):
            raise AttributeReadOnly(f"{_name(attr)} is set by the token")
        if rule.flags & F.SO_TRUE and value is True and not is_so:
            raise AttributeReadOnly(f"{_name(attr)} can only be set to true by the SO")
    for attr, rule in rules.items():
        if rule.flags & required and attr not in given and attr not in made:
            raise TemplateIncomplete(f"{_name(attr)} is required")
    attrs: Attributes = {}
    for attr, rule in rules.items():
        if rule.default is not None:
            attrs[attr] = rule.default
    attrs.update(made)
    attrs.update(given)
    attrs[CKA.CLASS] = cls
    if key_type is not None:
        attrs[CKA.KEY_TYPE] = key_type
    return attrs


def set_key_origin(attrs: Attributes, *, local: bool, mechanism: int | None) -> None:
    """CKA_LOCAL, CKA_KEY_GEN_MECHANISM, CKA_ALWAYS_SENSITIVE, CKA_NEVER_EXTRACTABLE (Base 4.8-4.9)."""
    cls = attrs.get(CKA.CLASS)
    if cls not in (CKO.PUBLIC_KEY, CKO.PRIVATE_KEY, CKO.SECRET_KEY):
        return
    attrs[CKA.LOCAL] = local
    attrs[CKA.KEY_GEN_MECHANISM] = mechanism if mechanism is not None else 0xFFFFFFFFFFFFFFFF
    if cls != CKO.PUBLIC_KEY:
        attrs[CKA.ALWAYS_SENSITIVE] = local and attrs.get(CKA.SENSITIVE) is True
        attrs[CKA.NEVER_EXTRACTABLE] = local and attrs.get(CKA.EXTRACTABLE) is False


def check_change(current: Mapping[int, AttrValue], template: Template, *, copying: bool, is_so: bool) -> Attributes:
    """The attributes after C_SetAttributeValue (copying=False) or C_CopyObject (True)."""
    if not copying and current.get(CKA.MODIFIABLE) is False:
        raise ActionProhibited("the object is not modifiable (CKA_MODIFIABLE is false)")
    cls = int(current[CKA.CLASS])  # type: ignore[arg-type]
    key_type = current.get(CKA.KEY_TYPE)
    rules = policy.rules(cls, key_type if isinstance(key_type, int) else None)
    updated = dict(current)
    for attr, value in template:
        rule = rules.get(attr)
        if rule is None:
            raise AttributeTypeInvalid(f"{_name(attr)} is not an attribute of this object class")
        allowed = F.MODIFIABLE | (F.COPY if copying else F(0))
        if not rule.flags & allowed:
            # Even when the value is unchanged: an answer that depended on it would reveal
            # secret values (CKA_VALUE) to whoever guesses them.
            raise AttributeReadOnly(f"{_name(attr)} cannot be changed")
        old = current.get(attr)
        if value == old:
            continue
        if rule.flags & F.STICKY_TRUE and old is True:
            raise AttributeReadOnly(f"{_name(attr)} cannot change once true")
        if rule.flags & F.STICKY_FALSE and old is False:
            raise AttributeReadOnly(f"{_name(attr)} cannot change once false")
        if rule.flags & F.SO_TRUE and value is True and not is_so:
            raise AttributeReadOnly(f"{_name(attr)} can only be set to true by the SO")
        updated[attr] = value
    return updated


# Read for every object a search looks at: module globals are read faster than enum members.
_CLASS, _KEY_TYPE, _SENSITIVE, _EXTRACTABLE = (
    int(CKA.CLASS),
    int(CKA.KEY_TYPE),
    int(CKA.SENSITIVE),
    int(CKA.EXTRACTABLE),
)
_KEY_CLASSES = frozenset({int(CKO.PRIVATE_KEY), int(CKO.SECRET_KEY)})


def unreadable(attrs: Mapping[int, AttrValue], attr: int) -> bool:
    """True when ``attr`` is a secret component that CKA_SENSITIVE / !CKA_EXTRACTABLE hides."""
    cls = attrs.get(_CLASS)
    if cls not in _KEY_CLASSES:
        return False
    key_type = attrs.get(_KEY_TYPE)
    if not policy.is_sensitive_attribute(int(cls), key_type if isinstance(key_type, int) else None, attr):
        return False
    return attrs.get(_SENSITIVE) is True or attrs.get(_EXTRACTABLE) is False


def matches(attrs: Mapping[int, AttrValue], template: Iterable[tuple[int, AttrValue]]) -> bool:
    """C_FindObjectsInit matching: every template attribute present and equal; secrets never match."""
    for attr, value in template:  # noqa: SIM110 - a loop, not all() over a generator: this runs per object
        if attrs.get(attr) != value or unreadable(attrs, attr):
            return False
    return True


def _name(attr: int) -> str:
    try:
        return str(CKA(attr))
    except ValueError:
        return f"attribute {attr:#x}"
