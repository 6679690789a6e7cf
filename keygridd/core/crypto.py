"""Cryptographic functions: operation state machines, key generation, wrapping, derivation.

PKCS#11 v2.40 Base 5.9-5.14 and 5.2 (the output-buffer convention): a length
query (``out_len`` -1, C's NULL buffer) or a short buffer leaves the operation
active, any other error ends it, and a successful single-part call or Final
ends it. A short buffer computes the output once and keeps it for the retry.
Expensive computations are yielded as ``Offload`` work.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import keygridd.mechanisms as mechanisms
from keygridd.core import objects
from keygridd.core.base import CoreState
from keygridd.core.model import Application, Obj, Operation, OpKind, Session
from keygridd.core.objectfns import ObjectFunctions
from keygridd.core.objects import Origin, Template
from keygridd.core.offload import Offload, Work
from keygridd.core.store import Attributes
from keygridd.mechanisms import Cost
from keygridd.mechanisms import Mechanism as MechanismImpl
from keygridd.mechanisms.base import EcdsaJob, final_sign_job, sign_job
from keygridd.pkcs11 import CKA, CKO, MechanismFlag
from keygridd.pkcs11.errors import (
    BufferTooSmall,
    DataLenRange,
    EncryptedDataInvalid,
    EncryptedDataLenRange,
    FunctionNotSupported,
    KeyFunctionNotPermitted,
    KeyHandleInvalid,
    KeyIndigestible,
    KeyNotWrappable,
    KeySizeRange,
    KeyTypeInconsistent,
    KeyUnextractable,
    MechanismInvalid,
    OperationActive,
    OperationNotInitialized,
    PKCS11Error,
    TemplateInconsistent,
    UnwrappingKeyHandleInvalid,
    UnwrappingKeySizeRange,
    UnwrappingKeyTypeInconsistent,
    UserNotLoggedIn,
    WrappedKeyInvalid,
    WrappedKeyLenRange,
    WrappingKeyHandleInvalid,
    WrappingKeySizeRange,
    WrappingKeyTypeInconsistent,
)
from keygridd.pkcs11.params import Mechanism

Out = list[Any]  # [output bytes or nil, length]

_USAGE = {
    OpKind.ENCRYPT: (CKA.ENCRYPT, int(MechanismFlag.ENCRYPT), "encrypt_init"),
    OpKind.DECRYPT: (CKA.DECRYPT, int(MechanismFlag.DECRYPT), "decrypt_init"),
    OpKind.SIGN: (CKA.SIGN, int(MechanismFlag.SIGN), "sign_init"),
    OpKind.VERIFY: (CKA.VERIFY, int(MechanismFlag.VERIFY), "verify_init"),
}


# Read on every operation: module globals are read faster than enum members.
_ALLOWED_MECHANISMS, _ALWAYS_AUTHENTICATE = int(CKA.ALLOWED_MECHANISMS), int(CKA.ALWAYS_AUTHENTICATE)
_THREAD = Cost.THREAD
_ENCRYPT, _DECRYPT, _SIGN = OpKind.ENCRYPT, OpKind.DECRYPT, OpKind.SIGN


class CryptoFunctions(ObjectFunctions, CoreState):
    # --- shared machinery -------------------------------------------------------------------------

    def _mechanism(self, session: Session, mechanism: Mechanism, flag: int) -> MechanismImpl:
        info = self.slots[session.slot_id].mechanisms.get(mechanism.mechanism)
        if info is None or not info.flags & flag:
            raise MechanismInvalid(f"mechanism {mechanism.mechanism:#x} cannot do this on this token")
        return mechanisms.get(mechanism.mechanism)

    def _check_key_use(self, key: Obj, attr: int, mechanism: int) -> None:
        if key.attrs.get(attr) is not True:
            raise KeyFunctionNotPermitted(f"the key does not allow {CKA(attr)}")
        allowed = key.attrs.get(_ALLOWED_MECHANISMS)
        if isinstance(allowed, tuple) and allowed and mechanism not in allowed:
            raise MechanismInvalid("the key's CKA_ALLOWED_MECHANISMS excludes this mechanism")

    def init_operation(self, session: Session, kind: OpKind, mechanism: Mechanism, key: Obj) -> Operation:
        attr, flag, method = _USAGE[kind]
        if kind in session.ops:
            raise OperationActive(f"a {kind.value} operation is active")
        impl = self._mechanism(session, mechanism, flag)
        self._check_key_use(key, attr, mechanism.mechanism)
        loaded = self.key(session, key)
        context = getattr(impl, method)(loaded, mechanism.param)
        return Operation(
            kind, context, mechanism.mechanism, key, impl.cost(loaded) is _THREAD,
            needs_context_login=key.attrs.get(_ALWAYS_AUTHENTICATE) is True,
        )  # fmt: skip

    def _begin(self, app: Application, handle: int, kind: OpKind, mechanism: Mechanism, key_handle: int) -> None:
        session = self.session(app, handle)
        key = self.object(session, key_handle, KeyHandleInvalid)
        session.ops[kind] = self.init_operation(session, kind, mechanism, key)

    def _op(self, session: Session, kind: OpKind, *, multipart: bool | None = None) -> Operation:
        op = session.ops.get(kind)
        if op is None:
            raise OperationNotInitialized(f"no {kind.value} operation is active")
        if op.needs_context_login:
            raise UserNotLoggedIn("this key needs C_Login(CKU_CONTEXT_SPECIFIC) before each use")
        if multipart is False and op.multipart:
            session.ops.pop(kind, None)
            raise OperationActive("a multi-part operation is in progress")
        if multipart:
            op.multipart = True
        return op

    def _run(
        self,
        session: Session,
        op: Operation,
        step: str,
        data: bytes,
        out_len: int | None,
        bound: Callable[[], int],
        compute: Callable[[], bytes],
        ends: bool,
        job: Callable[[], EcdsaJob | None] | None = None,
    ) -> Work[Out]:
        """Apply the output-buffer convention around one computation. ``job`` describes it for the
        server's signer, asked only when the output is computed (it may finish the context's hash)."""
        try:
            cached = op.pending is not None and op.pending[:2] == (step, data)
            if out_len == -1:  # a length query never ends the operation
                return [None, len(op.pending[2]) if op.pending is not None and cached else bound()]
            if cached and op.pending is not None:
                output = op.pending[2]
            else:
                output = yield Offload(compute, op.thread, job=job() if job is not None else None)
            if out_len is not None and out_len >= 0 and len(output) > out_len:
                op.pending = (step, data, output)
                raise BufferTooSmall(f"{len(output)} bytes needed", result=[None, len(output)])
        except BufferTooSmall:
            raise
        except BaseException:
            session.ops.pop(op.kind, None)
            raise
        op.pending = None
        if ends:
            session.ops.pop(op.kind, None)
        return [output, len(output)]

    # --- encrypt / decrypt -----------------------------------------------------------------------

    def C_EncryptInit(self, app: Application, handle: int, mechanism: Mechanism, key: int) -> None:
        self._begin(app, handle, _ENCRYPT, mechanism, key)

    def C_DecryptInit(self, app: Application, handle: int, mechanism: Mechanism, key: int) -> None:
        self._begin(app, handle, _DECRYPT, mechanism, key)

    def _cipher(self, app: Application, handle: int, kind: OpKind, data: bytes, out_len: int | None) -> Work[Out]:
        session = self.session(app, handle)
        op = self._op(session, kind, multipart=False)
        ctx = op.context
        return (
            yield from self._run(
                session, op, "one", data, out_len, lambda: ctx.one_shot_length(len(data)),
                lambda: ctx.one_shot(data), True,
            )
        )  # fmt: skip

    def _cipher_update(
        self, app: Application, handle: int, kind: OpKind, data: bytes, out_len: int | None
    ) -> Work[Out]:
        session = self.session(app, handle)
        op = self._op(session, kind, multipart=True)
        ctx = op.context
        return (
            yield from self._run(
                session, op, "update", data, out_len, lambda: ctx.update_length(len(data)),
                lambda: ctx.update(data), False,
            )
        )  # fmt: skip

    def _cipher_final(self, app: Application, handle: int, kind: OpKind, out_len: int | None) -> Work[Out]:
        session = self.session(app, handle)
        op = self._op(session, kind)
        ctx = op.context
        return (yield from self._run(session, op, "final", b"", out_len, ctx.final_length, ctx.final, True))

    def C_Encrypt(self, app: Application, handle: int, data: bytes, out_len: int | None) -> Work[Out]:
        return (yield from self._cipher(app, handle, _ENCRYPT, data, out_len))

    def C_EncryptUpdate(self, app: Application, handle: int, data: bytes, out_len: int | None) -> Work[Out]:
        return (yield from self._cipher_update(app, handle, OpKind.ENCRYPT, data, out_len))

    def C_EncryptFinal(self, app: Application, handle: int, out_len: int | None) -> Work[Out]:
        return (yield from self._cipher_final(app, handle, OpKind.ENCRYPT, out_len))

    def C_Decrypt(self, app: Application, handle: int, data: bytes, out_len: int | None) -> Work[Out]:
        return (yield from self._cipher(app, handle, _DECRYPT, data, out_len))

    def C_DecryptUpdate(self, app: Application, handle: int, data: bytes, out_len: int | None) -> Work[Out]:
        return (yield from self._cipher_update(app, handle, OpKind.DECRYPT, data, out_len))

    def C_DecryptFinal(self, app: Application, handle: int, out_len: int | None) -> Work[Out]:
        return (yield from self._cipher_final(app, handle, OpKind.DECRYPT, out_len))

    # --- digest ----------------------------------------------------------------------------------

    def C_DigestInit(self, app: Application, handle: int, mechanism: Mechanism) -> None:
        session = self.session(app, handle)
        if OpKind.DIGEST in session.ops:
            raise OperationActive("a digest operation is active")
        impl = self._mechanism(session, mechanism, MechanismFlag.DIGEST)
        session.ops[OpKind.DIGEST] = Operation(OpKind.DIGEST, impl.digest_init(mechanism.param), mechanism.mechanism)

    def C_Digest(self, app: Application, handle: int, data: bytes, out_len: int | None) -> Work[Out]:
        session = self.session(app, handle)
        op = self._op(session, OpKind.DIGEST, multipart=False)
        ctx = op.context
        return (
            yield from self._run(session, op, "one", data, out_len, lambda: ctx.length, lambda: ctx.digest(data), True)
        )

    def C_DigestUpdate(self, app: Application, handle: int, data: bytes) -> None:
        session = self.session(app, handle)
        self._op(session, OpKind.DIGEST, multipart=True).context.update(data)

    def C_DigestKey(self, app: Application, handle: int, key: int) -> None:
        session = self.session(app, handle)
        op = self._op(session, OpKind.DIGEST, multipart=True)
        obj = self.object(session, key, KeyHandleInvalid)
        value = obj.attrs.get(CKA.VALUE)
        if obj.cls != CKO.SECRET_KEY or not isinstance(value, bytes):
            session.ops.pop(OpKind.DIGEST, None)
            raise KeyIndigestible("only secret keys can be digested")
        op.context.update(value)

    def C_DigestFinal(self, app: Application, handle: int, out_len: int | None) -> Work[Out]:
        session = self.session(app, handle)
        op = self._op(session, OpKind.DIGEST)
        ctx = op.context
        return (yield from self._run(session, op, "final", b"", out_len, lambda: ctx.length, ctx.final, True))

    # --- sign / verify ---------------------------------------------------------------------------

    def C_SignInit(self, app: Application, handle: int, mechanism: Mechanism, key: int) -> None:
        self._begin(app, handle, _SIGN, mechanism, key)

    def C_Sign(self, app: Application, handle: int, data: bytes, out_len: int | None) -> Work[Out]:
        session = self.session(app, handle)
        op = self._op(session, _SIGN, multipart=False)
        ctx = op.context
        return (
            yield from self._run(
                session, op, "one", data, out_len, lambda: ctx.length, lambda: ctx.sign(data), True,
                lambda: sign_job(ctx, data),
            )
        )  # fmt: skip

    def C_SignUpdate(self, app: Application, handle: int, data: bytes) -> Work[None]:
        session = self.session(app, handle)
        op = self._op(session, OpKind.SIGN, multipart=True)
        yield from self._step(session, op, lambda: op.context.update(data))

    def C_SignFinal(self, app: Application, handle: int, out_len: int | None) -> Work[Out]:
        session = self.session(app, handle)
        op = self._op(session, _SIGN)
        ctx = op.context
        return (
            yield from self._run(
                session, op, "final", b"", out_len, lambda: ctx.length, ctx.final, True, lambda: final_sign_job(ctx)
            )
        )

    def C_VerifyInit(self, app: Application, handle: int, mechanism: Mechanism, key: int) -> None:
        self._begin(app, handle, OpKind.VERIFY, mechanism, key)

    def C_Verify(self, app: Application, handle: int, data: bytes, signature: bytes) -> Work[None]:
        session = self.session(app, handle)
        op = self._op(session, OpKind.VERIFY, multipart=False)
        session.ops.pop(OpKind.VERIFY, None)
        yield Offload(lambda: op.context.verify(data, signature), op.thread)

    def C_VerifyUpdate(self, app: Application, handle: int, data: bytes) -> Work[None]:
        session = self.session(app, handle)
        op = self._op(session, OpKind.VERIFY, multipart=True)
        yield from self._step(session, op, lambda: op.context.update(data))

    def C_VerifyFinal(self, app: Application, handle: int, signature: bytes) -> Work[None]:
        session = self.session(app, handle)
        op = self._op(session, OpKind.VERIFY)
        session.ops.pop(OpKind.VERIFY, None)
        yield Offload(lambda: op.context.final(signature), op.thread)

    def _step(self, session: Session, op: Operation, fn: Callable[[], None]) -> Work[None]:
        try:
            yield Offload(fn, False)
        except BaseException:
            session.ops.pop(op.kind, None)
            raise

    def _unsupported(self, app: Application, handle: int) -> None:
        self.session(app, handle)
        raise FunctionNotSupported("this function is not served")

    def C_SignRecoverInit(self, app: Application, handle: int, mechanism: Mechanism, key: int) -> None:
        self._unsupported(app, handle)

    def C_SignRecover(self, app: Application, handle: int, data: bytes, out_len: int | None) -> Out:
        self._unsupported(app, handle)
        return []

    def C_VerifyRecoverInit(self, app: Application, handle: int, mechanism: Mechanism, key: int) -> None:
        self._unsupported(app, handle)

    def C_VerifyRecover(self, app: Application, handle: int, signature: bytes, out_len: int | None) -> Out:
        self._unsupported(app, handle)
        return []

    def C_DigestEncryptUpdate(self, app: Application, handle: int, data: bytes, out_len: int | None) -> Out:
        self._unsupported(app, handle)
        return []

    def C_DecryptDigestUpdate(self, app: Application, handle: int, data: bytes, out_len: int | None) -> Out:
        self._unsupported(app, handle)
        return []

    def C_SignEncryptUpdate(self, app: Application, handle: int, data: bytes, out_len: int | None) -> Out:
        self._unsupported(app, handle)
        return []

    def C_DecryptVerifyUpdate(self, app: Application, handle: int, data: bytes, out_len: int | None) -> Out:
        self._unsupported(app, handle)
        return []

    # --- key management --------------------------------------------------------------------------

    def C_GenerateKey(self, app: Application, handle: int, mechanism: Mechanism, template: Template) -> Work[int]:
        session = self.session(app, handle)
        impl = self._mechanism(session, mechanism, MechanismFlag.GENERATE)
        given = dict(template)
        made = yield Offload(lambda: impl.generate_key(given), impl.cost(None) is Cost.THREAD)
        attrs = objects.build(template, Origin.GENERATE, generated=made, default_cls=CKO.SECRET_KEY)
        objects.set_key_origin(attrs, local=True, mechanism=mechanism.mechanism)
        return (yield from self.store_object(session, attrs))

    def C_GenerateKeyPair(
        self, app: Application, handle: int, mechanism: Mechanism, public: Template, private: Template
    ) -> Work[list[int]]:
        session = self.session(app, handle)
        impl = self._mechanism(session, mechanism, MechanismFlag.GENERATE_KEY_PAIR)
        pub_given, priv_given = dict(public), dict(private)
        # Check both templates before the (possibly slow) generation.
        for given in (pub_given, priv_given):
            self._check_writable(session, given)
        made_pub, made_priv = yield Offload(
            lambda: impl.generate_key_pair(pub_given, priv_given), impl.cost(None) is Cost.THREAD
        )
        pub = objects.build(public, Origin.GENERATE, generated=made_pub, default_cls=CKO.PUBLIC_KEY)
        priv = objects.build(private, Origin.GENERATE, generated=made_priv, default_cls=CKO.PRIVATE_KEY)
        for attrs in (pub, priv):
            objects.set_key_origin(attrs, local=True, mechanism=mechanism.mechanism)
        self._check_writable(session, pub)
        self._check_writable(session, priv)
        pub_handle = yield from self.store_object(session, pub)
        priv_handle = yield from self.store_object(session, priv)
        return [pub_handle, priv_handle]

    def _key_bytes(self, session: Session, key: Obj) -> bytes:
        if key.cls == CKO.SECRET_KEY and isinstance(key.attrs.get(CKA.VALUE), bytes):
            return key.attrs[CKA.VALUE]  # type: ignore[return-value]
        if key.cls == CKO.PRIVATE_KEY:
            return mechanisms.private_key_to_pkcs8(self.key(session, key))
        raise KeyNotWrappable("only secret and private keys can be wrapped")

    def C_WrapKey(
        self, app: Application, handle: int, mechanism: Mechanism, wrapping: int, key: int, out_len: int | None
    ) -> Work[Out]:
        session = self.session(app, handle)
        wrapper = self.object(session, wrapping, WrappingKeyHandleInvalid)
        target = self.object(session, key, KeyHandleInvalid)
        impl = self._mechanism(session, mechanism, MechanismFlag.WRAP)
        self._check_key_use(wrapper, CKA.WRAP, mechanism.mechanism)
        if target.attrs.get(CKA.EXTRACTABLE) is not True and target.cls != CKO.PUBLIC_KEY:
            raise KeyUnextractable("the key is not extractable")
        if target.attrs.get(CKA.WRAP_WITH_TRUSTED) is True and wrapper.attrs.get(CKA.TRUSTED) is not True:
            raise KeyNotWrappable("the key may only be wrapped by a trusted key")
        template = wrapper.attrs.get(CKA.WRAP_TEMPLATE)
        if isinstance(template, tuple) and template and not objects.matches(target.attrs, template):  # type: ignore[arg-type]
            raise KeyNotWrappable("the key does not match the wrapping key's CKA_WRAP_TEMPLATE")
        loaded = self.key(session, wrapper)
        try:
            context = impl.encrypt_init(loaded, mechanism.param)
        except KeyTypeInconsistent:
            raise WrappingKeyTypeInconsistent("the wrapping key does not suit the mechanism") from None
        except KeySizeRange:
            raise WrappingKeySizeRange("the wrapping key's size does not suit the mechanism") from None
        material = self._key_bytes(session, target)
        try:
            output: bytes = yield Offload(lambda: context.one_shot(material), impl.cost(loaded) is Cost.THREAD)
        except DataLenRange:
            raise KeySizeRange("the mechanism cannot wrap a key of this length") from None
        if out_len == -1 or (out_len is not None and len(output) > out_len):
            if out_len == -1:
                return [None, len(output)]
            raise BufferTooSmall(f"{len(output)} bytes needed", result=[None, len(output)])
        return [output, len(output)]

    def C_UnwrapKey(
        self, app: Application, handle: int, mechanism: Mechanism, unwrapping: int, wrapped: bytes, template: Template
    ) -> Work[int]:
        session = self.session(app, handle)
        unwrapper = self.object(session, unwrapping, UnwrappingKeyHandleInvalid)
        impl = self._mechanism(session, mechanism, MechanismFlag.UNWRAP)
        self._check_key_use(unwrapper, CKA.UNWRAP, mechanism.mechanism)
        loaded = self.key(session, unwrapper)
        try:
            context = impl.decrypt_init(loaded, mechanism.param)
        except KeyTypeInconsistent:
            raise UnwrappingKeyTypeInconsistent("the unwrapping key does not suit the mechanism") from None
        except KeySizeRange:
            raise UnwrappingKeySizeRange("the unwrapping key's size does not suit the mechanism") from None
        try:
            material: bytes = yield Offload(lambda: context.one_shot(wrapped), impl.cost(loaded) is Cost.THREAD)
        except EncryptedDataInvalid:
            raise WrappedKeyInvalid("the wrapped key does not decrypt") from None
        except EncryptedDataLenRange:
            raise WrappedKeyLenRange("the wrapped key has a wrong length") from None
        given = dict(template)
        made: Attributes
        if given.get(CKA.CLASS) == CKO.PRIVATE_KEY:
            try:
                made = cast(Attributes, mechanisms.private_key_from_pkcs8(material))
            except PKCS11Error:
                raise WrappedKeyInvalid("the unwrapped data is not a PKCS#8 private key") from None
        else:
            made = {CKA.VALUE: material, CKA.VALUE_LEN: len(material)}
        # The unwrapping key's CKA_UNWRAP_TEMPLATE joins the caller's template (Base 4.9): a value
        # both give differently is inconsistent, and the policy table judges the union.
        combined = list(template)
        unwrap_template = unwrapper.attrs.get(CKA.UNWRAP_TEMPLATE)
        if isinstance(unwrap_template, tuple):
            for attr, value in cast(tuple[tuple[int, Any], ...], unwrap_template):
                if attr not in given:
                    combined.append((attr, value))
                elif given[attr] != value:
                    raise TemplateInconsistent("the template contradicts the unwrapping key's CKA_UNWRAP_TEMPLATE")
        attrs = objects.build(combined, Origin.UNWRAP, generated=made)
        attrs = cast(Attributes, mechanisms.validate_import(attrs))
        objects.set_key_origin(attrs, local=False, mechanism=None)
        return (yield from self.store_object(session, attrs))

    def C_DeriveKey(
        self, app: Application, handle: int, mechanism: Mechanism, base_key: int, template: Template
    ) -> Work[int]:
        session = self.session(app, handle)
        base = self.object(session, base_key, KeyHandleInvalid)
        impl = self._mechanism(session, mechanism, MechanismFlag.DERIVE)
        self._check_key_use(base, CKA.DERIVE, mechanism.mechanism)
        loaded = self.key(session, base)
        given: Mapping[int, Any] = dict(template)
        secret: bytes = yield Offload(lambda: impl.derive(loaded, mechanism.param, given), False)
        made: Attributes = {CKA.CLASS: CKO.SECRET_KEY, CKA.VALUE: secret, CKA.VALUE_LEN: len(secret)}
        attrs = objects.build(template, Origin.DERIVE, generated=made, default_cls=CKO.SECRET_KEY)
        attrs = cast(Attributes, mechanisms.validate_import(attrs))
        objects.set_key_origin(attrs, local=False, mechanism=None)
        attrs[CKA.ALWAYS_SENSITIVE] = base.attrs.get(CKA.ALWAYS_SENSITIVE) is True and attrs.get(CKA.SENSITIVE) is True
        attrs[CKA.NEVER_EXTRACTABLE] = (
            base.attrs.get(CKA.NEVER_EXTRACTABLE) is True and attrs.get(CKA.EXTRACTABLE) is False
        )
        return (yield from self.store_object(session, attrs))
