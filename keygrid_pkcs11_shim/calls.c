/* calls.c - one stub per PKCS#11 function, forwarded to the keygridd method of
 * the same name (keygridd/protocol/calls.py gives the argument order).
 *
 * Grammar: BEGIN / BEGIN_SESSION, the IN_* arguments in call-table order,
 * PROCESS, the OUT_* results, END. Each step runs only while rv_ is CKR_OK
 * (the OUT_ steps that apply a spec rule also see the daemon's code), so a
 * stub reads as its wire signature. Output conventions (v2.40 Base 5.2):
 * a NULL output buffer sends out_len -1 (a length query); otherwise the
 * caller's *pulLen, and the daemon answers CKR_BUFFER_TOO_SMALL with the
 * length and keeps the operation active.
 *
 * Without a daemon: C_GetSlotList lists no slots, C_GetInfo describes the
 * module, C_WaitForSlotEvent has no event and slot calls get
 * CKR_SLOT_ID_INVALID. Debug logs name the call and its result only: never
 * PINs, data or attribute values.
 */
#include <string.h>

#include "keygrid.h"

#define OK_ (rv_ == CKR_OK)
#define RAN (c_.reply != NULL)
#define STEP(cond, ...)                    \
	do {                               \
		if (cond) { __VA_ARGS__; } \
	} while (0)

#define BEGIN(name)                                                    \
	struct kg_call c_ = {0};                                       \
	CK_RV rv_ = kg_check_live();                                   \
	STEP(OK_, rv_ = kg_call_begin(&c_, KG_M_##name, KG_GEN_NONE)); \
	STEP(c_.absent, rv_ = CKR_SLOT_ID_INVALID)
#define BEGIN_SESSION(name, h)                                  \
	struct kg_call c_ = {.session = (h), .has_session = 1}; \
	uint32_t gen_ = 0;                                      \
	CK_RV rv_ = kg_check_live();                            \
	STEP(OK_, rv_ = kg_session_check((h), &gen_));          \
	STEP(OK_, rv_ = kg_call_begin(&c_, KG_M_##name, gen_)); \
	IN_ULONG((h)&0xffffffffUL)
#define ON_ABSENT(...) STEP(c_.absent, rv_ = CKR_OK; __VA_ARGS__)
#define ARG(cond)      STEP(OK_ && !(cond), rv_ = CKR_ARGUMENTS_BAD)
#define IN_ULONG(v)    STEP(OK_, kg_put_uint(&c_.req, (v)))
#define IN_BOOL(v)     STEP(OK_, kg_put_bool(&c_.req, (v) != CK_FALSE))
#define IN_BYTES(p, n)    \
	ARG((p) || !(n)); \
	STEP(OK_, kg_put_bin(&c_.req, (p), (n)))
#define IN_OUTLEN(p, plen) \
	ARG(plen);         \
	STEP(OK_, (p) ? kg_put_uint(&c_.req, *(plen)) : kg_put_int(&c_.req, -1))
#define IN_TEMPLATE(t, n) STEP(OK_, rv_ = kg_put_template(&c_.req, (t), (n), 0))
#define IN_MECHANISM(m)   STEP(OK_, rv_ = kg_put_mechanism(&c_.req, (m)))
#define IN_TYPES(t, n)          \
	ARG((t) || !(n));       \
	ARG((n) <= UINT32_MAX); \
	STEP(OK_, put_types(&c_.req, (t), (n)))
#define PROCESS                  STEP(OK_ &&c_.conn, rv_ = kg_call_run(&c_))
#define OUT_ULONG(p)             STEP(OK_ &&RAN, rv_ = get_ulong(&c_.res, (p)))
#define OUT_DATA(p, plen)        STEP(RAN, rv_ = kg_get_out(&c_.res, rv_, (p), (plen)))
#define OUT_BYTES(p, plen)       STEP(OK_ &&RAN, rv_ = kg_get_bytes(&c_.res, (p), (plen)))
#define OUT_INFO(kind, p)        STEP(OK_ &&RAN, rv_ = kg_get_info(&c_.res, (kind), (p)))
#define OUT_ULONGS(p, pn, fixed) STEP(OK_ &&RAN, rv_ = kg_get_ulongs(&c_.res, (p), (pn), (fixed)))
#define OUT_ATTRS(t, n)          STEP(RAN, rv_ = kg_get_attribute_values(&c_.res, (t), (n), rv_))
#define END(name)                                  \
	kg_call_end(&c_);                          \
	KG_DEBUG("%s -> CK_RV 0x%lx", #name, rv_); \
	return rv_

typedef CK_SESSION_HANDLE S;
typedef CK_BYTE_PTR B;
typedef CK_ULONG U;
typedef CK_ULONG_PTR UP;

static void put_types(struct kg_buf *b, const CK_ATTRIBUTE *t, CK_ULONG n)
{
	kg_put_array(b, (uint32_t)n);
	for (CK_ULONG i = 0; i < n; i++)
		kg_put_uint(b, t[i].type);
}

static CK_RV get_ulong(struct kg_reader *r, CK_ULONG *out)
{
	uint64_t v;
	if (kg_get_uint(r, &v)) return CKR_DEVICE_ERROR;
	*out = (CK_ULONG)v;
	return CKR_OK;
}

/* ---- general, slots and tokens (v2.40 Base 5.4, 5.5) ---- */

static CK_RV local_info(CK_INFO_PTR info) /* the module itself, while no daemon answers */
{
	if (!info) return CKR_ARGUMENTS_BAD;
	*info = (CK_INFO){.cryptokiVersion = {2, 40}};
	kg_pad(info->manufacturerID, 32, "KeyGrid", 7);
	kg_pad(info->libraryDescription, 32, "KeyGrid PKCS#11 module", 22);
	return CKR_OK;
}

CK_RV C_GetInfo(CK_INFO_PTR pInfo)
{
	BEGIN(C_GetInfo);
	ARG(pInfo);
	ON_ABSENT(rv_ = local_info(pInfo));
	PROCESS;
	OUT_INFO(KG_INFO, pInfo);
	END(C_GetInfo);
}

CK_RV C_GetSlotList(CK_BBOOL tokenPresent, CK_SLOT_ID_PTR pSlotList, UP pulCount)
{
	BEGIN(C_GetSlotList);
	ON_ABSENT(if (pulCount) *pulCount = 0; else rv_ = CKR_ARGUMENTS_BAD);
	ARG(pulCount);
	IN_BOOL(tokenPresent);
	PROCESS;
	OUT_ULONGS(pSlotList, pulCount, 0);
	END(C_GetSlotList);
}

CK_RV C_GetSlotInfo(CK_SLOT_ID slotID, CK_SLOT_INFO_PTR pInfo)
{
	BEGIN(C_GetSlotInfo);
	ARG(pInfo);
	IN_ULONG(slotID);
	PROCESS;
	OUT_INFO(KG_SLOT_INFO, pInfo);
	END(C_GetSlotInfo);
}

CK_RV C_GetTokenInfo(CK_SLOT_ID slotID, CK_TOKEN_INFO_PTR pInfo)
{
	BEGIN(C_GetTokenInfo);
	ARG(pInfo);
	IN_ULONG(slotID);
	PROCESS;
	OUT_INFO(KG_TOKEN_INFO, pInfo);
	END(C_GetTokenInfo);
}

CK_RV C_WaitForSlotEvent(CK_FLAGS flags, CK_SLOT_ID_PTR pSlot, CK_VOID_PTR pReserved)
{
	BEGIN(C_WaitForSlotEvent);
	ON_ABSENT(rv_ = flags & CKF_DONT_BLOCK ? CKR_NO_EVENT : CKR_FUNCTION_NOT_SUPPORTED);
	ARG(pSlot && !pReserved);
	IN_ULONG(flags);
	PROCESS;
	OUT_ULONG(pSlot);
	END(C_WaitForSlotEvent);
}

CK_RV C_GetMechanismList(CK_SLOT_ID slotID, CK_MECHANISM_TYPE_PTR pMechanismList, UP pulCount)
{
	BEGIN(C_GetMechanismList);
	ARG(pulCount);
	IN_ULONG(slotID);
	PROCESS;
	OUT_ULONGS(pMechanismList, pulCount, 0);
	END(C_GetMechanismList);
}

CK_RV C_GetMechanismInfo(CK_SLOT_ID slotID, CK_MECHANISM_TYPE type, CK_MECHANISM_INFO_PTR pInfo)
{
	BEGIN(C_GetMechanismInfo);
	ARG(pInfo);
	IN_ULONG(slotID);
	IN_ULONG(type);
	PROCESS;
	OUT_INFO(KG_MECHANISM_INFO, pInfo);
	END(C_GetMechanismInfo);
}

CK_RV C_InitToken(CK_SLOT_ID slotID, CK_UTF8CHAR_PTR pPin, U ulPinLen, CK_UTF8CHAR_PTR pLabel)
{
	BEGIN(C_InitToken);
	ARG(pLabel);
	IN_ULONG(slotID);
	IN_BYTES(pPin, ulPinLen);
	IN_BYTES(pLabel, 32);
	PROCESS;
	END(C_InitToken);
}

CK_RV C_InitPIN(S hSession, CK_UTF8CHAR_PTR pPin, U ulPinLen)
{
	BEGIN_SESSION(C_InitPIN, hSession);
	IN_BYTES(pPin, ulPinLen);
	PROCESS;
	END(C_InitPIN);
}

CK_RV C_SetPIN(S hSession, CK_UTF8CHAR_PTR pOldPin, U ulOldLen, CK_UTF8CHAR_PTR pNewPin, U ulNewLen)
{
	BEGIN_SESSION(C_SetPIN, hSession);
	IN_BYTES(pOldPin, ulOldLen);
	IN_BYTES(pNewPin, ulNewLen);
	PROCESS;
	END(C_SetPIN);
}

/* ---- sessions (v2.40 Base 5.6) ---- */

CK_RV C_OpenSession(CK_SLOT_ID slotID, CK_FLAGS flags, CK_VOID_PTR pApplication, CK_NOTIFY Notify,
                    CK_SESSION_HANDLE_PTR phSession)
{
	CK_ULONG handle = 0;
	(void)pApplication; /* the daemon sends no notifications */
	(void)Notify;
	BEGIN(C_OpenSession);
	ARG(phSession);
	IN_ULONG(slotID);
	IN_ULONG(flags);
	PROCESS;
	OUT_ULONG(&handle);
	STEP(OK_ && RAN, *phSession = kg_session_register(c_.gen, handle, slotID));
	STEP(OK_ && RAN && *phSession == CK_INVALID_HANDLE, rv_ = CKR_DEVICE_ERROR);
	END(C_OpenSession);
}

CK_RV C_CloseSession(S hSession)
{
	BEGIN_SESSION(C_CloseSession, hSession);
	PROCESS;
	STEP(RAN && (OK_ || rv_ == CKR_SESSION_HANDLE_INVALID), kg_session_remove(hSession));
	END(C_CloseSession);
}

CK_RV C_CloseAllSessions(CK_SLOT_ID slotID)
{
	BEGIN(C_CloseAllSessions);
	IN_ULONG(slotID);
	PROCESS;
	STEP(OK_ && RAN, kg_session_remove_slot(c_.gen, slotID));
	END(C_CloseAllSessions);
}

CK_RV C_GetSessionInfo(S hSession, CK_SESSION_INFO_PTR pInfo)
{
	BEGIN_SESSION(C_GetSessionInfo, hSession);
	ARG(pInfo);
	PROCESS;
	OUT_INFO(KG_SESSION_INFO, pInfo);
	END(C_GetSessionInfo);
}

CK_RV C_GetOperationState(S hSession, B pOperationState, UP pulOperationStateLen)
{
	BEGIN_SESSION(C_GetOperationState, hSession);
	ARG(pulOperationStateLen);
	PROCESS;
	OUT_BYTES(pOperationState, pulOperationStateLen);
	END(C_GetOperationState);
}

CK_RV C_SetOperationState(S hSession, B pOperationState, U ulLen, CK_OBJECT_HANDLE hEncryptionKey,
                          CK_OBJECT_HANDLE hAuthenticationKey)
{
	BEGIN_SESSION(C_SetOperationState, hSession);
	IN_BYTES(pOperationState, ulLen);
	IN_ULONG(hEncryptionKey);
	IN_ULONG(hAuthenticationKey);
	PROCESS;
	END(C_SetOperationState);
}

CK_RV C_Login(S hSession, CK_USER_TYPE userType, CK_UTF8CHAR_PTR pPin, U ulPinLen)
{
	BEGIN_SESSION(C_Login, hSession);
	IN_ULONG(userType);
	IN_BYTES(pPin, ulPinLen);
	PROCESS;
	END(C_Login);
}

CK_RV C_Logout(S hSession)
{
	BEGIN_SESSION(C_Logout, hSession);
	PROCESS;
	END(C_Logout);
}

/* ---- objects (v2.40 Base 5.7) ---- */

CK_RV C_CreateObject(S hSession, CK_ATTRIBUTE_PTR pTemplate, U ulCount, CK_OBJECT_HANDLE_PTR phObject)
{
	BEGIN_SESSION(C_CreateObject, hSession);
	ARG(phObject);
	IN_TEMPLATE(pTemplate, ulCount);
	PROCESS;
	OUT_ULONG(phObject);
	END(C_CreateObject);
}

CK_RV C_CopyObject(S hSession, CK_OBJECT_HANDLE hObject, CK_ATTRIBUTE_PTR pTemplate, U ulCount,
                   CK_OBJECT_HANDLE_PTR phNewObject)
{
	BEGIN_SESSION(C_CopyObject, hSession);
	ARG(phNewObject);
	IN_ULONG(hObject);
	IN_TEMPLATE(pTemplate, ulCount);
	PROCESS;
	OUT_ULONG(phNewObject);
	END(C_CopyObject);
}

CK_RV C_DestroyObject(S hSession, CK_OBJECT_HANDLE hObject)
{
	BEGIN_SESSION(C_DestroyObject, hSession);
	IN_ULONG(hObject);
	PROCESS;
	END(C_DestroyObject);
}

CK_RV C_GetObjectSize(S hSession, CK_OBJECT_HANDLE hObject, UP pulSize)
{
	BEGIN_SESSION(C_GetObjectSize, hSession);
	ARG(pulSize);
	IN_ULONG(hObject);
	PROCESS;
	OUT_ULONG(pulSize);
	END(C_GetObjectSize);
}

CK_RV C_GetAttributeValue(S hSession, CK_OBJECT_HANDLE hObject, CK_ATTRIBUTE_PTR pTemplate, U ulCount)
{
	BEGIN_SESSION(C_GetAttributeValue, hSession);
	IN_ULONG(hObject);
	IN_TYPES(pTemplate, ulCount);
	PROCESS;
	OUT_ATTRS(pTemplate, ulCount);
	END(C_GetAttributeValue);
}

CK_RV C_SetAttributeValue(S hSession, CK_OBJECT_HANDLE hObject, CK_ATTRIBUTE_PTR pTemplate, U ulCount)
{
	BEGIN_SESSION(C_SetAttributeValue, hSession);
	IN_ULONG(hObject);
	IN_TEMPLATE(pTemplate, ulCount);
	PROCESS;
	END(C_SetAttributeValue);
}

CK_RV C_FindObjectsInit(S hSession, CK_ATTRIBUTE_PTR pTemplate, U ulCount)
{
	BEGIN_SESSION(C_FindObjectsInit, hSession);
	IN_TEMPLATE(pTemplate, ulCount);
	PROCESS;
	END(C_FindObjectsInit);
}

CK_RV C_FindObjects(S hSession, CK_OBJECT_HANDLE_PTR phObject, U ulMaxObjectCount, UP pulObjectCount)
{
	BEGIN_SESSION(C_FindObjects, hSession);
	ARG(pulObjectCount && (phObject || !ulMaxObjectCount));
	IN_ULONG(ulMaxObjectCount);
	PROCESS;
	STEP(OK_ && RAN, *pulObjectCount = ulMaxObjectCount);
	OUT_ULONGS(phObject, pulObjectCount, 1);
	END(C_FindObjects);
}

CK_RV C_FindObjectsFinal(S hSession)
{
	BEGIN_SESSION(C_FindObjectsFinal, hSession);
	PROCESS;
	END(C_FindObjectsFinal);
}

/* ---- cryptographic functions (v2.40 Base 5.8-5.13) ---- */

#define INIT_STUB(name)                                                            \
	CK_RV name(S hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hKey) \
	{                                                                          \
		BEGIN_SESSION(name, hSession);                                     \
		IN_MECHANISM(pMechanism);                                          \
		IN_ULONG(hKey);                                                    \
		PROCESS;                                                           \
		END(name);                                                         \
	}
#define DATA_STUB(name) /* (session, in, in_len, out, out_len) */      \
	CK_RV name(S hSession, B pIn, U ulInLen, B pOut, UP pulOutLen) \
	{                                                              \
		BEGIN_SESSION(name, hSession);                         \
		IN_BYTES(pIn, ulInLen);                                \
		IN_OUTLEN(pOut, pulOutLen);                            \
		PROCESS;                                               \
		OUT_DATA(pOut, pulOutLen);                             \
		END(name);                                             \
	}
#define FINAL_STUB(name) /* (session, out, out_len) */ \
	CK_RV name(S hSession, B pOut, UP pulOutLen)   \
	{                                              \
		BEGIN_SESSION(name, hSession);         \
		IN_OUTLEN(pOut, pulOutLen);            \
		PROCESS;                               \
		OUT_DATA(pOut, pulOutLen);             \
		END(name);                             \
	}
#define UPDATE_STUB(name) /* (session, in, in_len) */ \
	CK_RV name(S hSession, B pIn, U ulInLen)      \
	{                                             \
		BEGIN_SESSION(name, hSession);        \
		IN_BYTES(pIn, ulInLen);               \
		PROCESS;                              \
		END(name);                            \
	}

INIT_STUB(C_EncryptInit)
DATA_STUB(C_Encrypt)
DATA_STUB(C_EncryptUpdate)
FINAL_STUB(C_EncryptFinal)
INIT_STUB(C_DecryptInit)
DATA_STUB(C_Decrypt)
DATA_STUB(C_DecryptUpdate)
FINAL_STUB(C_DecryptFinal)
UPDATE_STUB(C_DigestUpdate)
FINAL_STUB(C_DigestFinal)
DATA_STUB(C_Digest)
INIT_STUB(C_SignInit)
DATA_STUB(C_Sign)
UPDATE_STUB(C_SignUpdate)
FINAL_STUB(C_SignFinal)
INIT_STUB(C_SignRecoverInit)
DATA_STUB(C_SignRecover)
INIT_STUB(C_VerifyInit)
UPDATE_STUB(C_VerifyUpdate)
UPDATE_STUB(C_VerifyFinal) /* (session, signature, signature_len) */
INIT_STUB(C_VerifyRecoverInit)
DATA_STUB(C_VerifyRecover)
DATA_STUB(C_DigestEncryptUpdate)
DATA_STUB(C_DecryptDigestUpdate)
DATA_STUB(C_SignEncryptUpdate)
DATA_STUB(C_DecryptVerifyUpdate)

CK_RV C_DigestInit(S hSession, CK_MECHANISM_PTR pMechanism)
{
	BEGIN_SESSION(C_DigestInit, hSession);
	IN_MECHANISM(pMechanism);
	PROCESS;
	END(C_DigestInit);
}

CK_RV C_DigestKey(S hSession, CK_OBJECT_HANDLE hKey)
{
	BEGIN_SESSION(C_DigestKey, hSession);
	IN_ULONG(hKey);
	PROCESS;
	END(C_DigestKey);
}

CK_RV C_Verify(S hSession, B pData, U ulDataLen, B pSignature, U ulSignatureLen)
{
	BEGIN_SESSION(C_Verify, hSession);
	IN_BYTES(pData, ulDataLen);
	IN_BYTES(pSignature, ulSignatureLen);
	PROCESS;
	END(C_Verify);
}

/* ---- keys and random numbers (v2.40 Base 5.14, 5.15) ---- */

CK_RV C_GenerateKey(S hSession, CK_MECHANISM_PTR pMechanism, CK_ATTRIBUTE_PTR pTemplate, U ulCount,
                    CK_OBJECT_HANDLE_PTR phKey)
{
	BEGIN_SESSION(C_GenerateKey, hSession);
	ARG(phKey);
	IN_MECHANISM(pMechanism);
	IN_TEMPLATE(pTemplate, ulCount);
	PROCESS;
	OUT_ULONG(phKey);
	END(C_GenerateKey);
}

CK_RV C_GenerateKeyPair(S hSession, CK_MECHANISM_PTR pMechanism, CK_ATTRIBUTE_PTR pPublicKeyTemplate,
                        U ulPublicKeyAttributeCount, CK_ATTRIBUTE_PTR pPrivateKeyTemplate, U ulPrivateKeyAttributeCount,
                        CK_OBJECT_HANDLE_PTR phPublicKey, CK_OBJECT_HANDLE_PTR phPrivateKey)
{
	CK_OBJECT_HANDLE keys[2];
	CK_ULONG count = 2;
	BEGIN_SESSION(C_GenerateKeyPair, hSession);
	ARG(phPublicKey && phPrivateKey);
	IN_MECHANISM(pMechanism);
	IN_TEMPLATE(pPublicKeyTemplate, ulPublicKeyAttributeCount);
	IN_TEMPLATE(pPrivateKeyTemplate, ulPrivateKeyAttributeCount);
	PROCESS;
	OUT_ULONGS(keys, &count, 1);
	STEP(OK_ && RAN && count != 2, rv_ = CKR_DEVICE_ERROR);
	STEP(OK_ && RAN, (*phPublicKey = keys[0], *phPrivateKey = keys[1]));
	END(C_GenerateKeyPair);
}

CK_RV C_WrapKey(S hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hWrappingKey, CK_OBJECT_HANDLE hKey,
                B pWrappedKey, UP pulWrappedKeyLen)
{
	BEGIN_SESSION(C_WrapKey, hSession);
	IN_MECHANISM(pMechanism);
	IN_ULONG(hWrappingKey);
	IN_ULONG(hKey);
	IN_OUTLEN(pWrappedKey, pulWrappedKeyLen);
	PROCESS;
	OUT_DATA(pWrappedKey, pulWrappedKeyLen);
	END(C_WrapKey);
}

CK_RV C_UnwrapKey(S hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hUnwrappingKey, B pWrappedKey,
                  U ulWrappedKeyLen, CK_ATTRIBUTE_PTR pTemplate, U ulAttributeCount, CK_OBJECT_HANDLE_PTR phKey)
{
	BEGIN_SESSION(C_UnwrapKey, hSession);
	ARG(phKey);
	IN_MECHANISM(pMechanism);
	IN_ULONG(hUnwrappingKey);
	IN_BYTES(pWrappedKey, ulWrappedKeyLen);
	IN_TEMPLATE(pTemplate, ulAttributeCount);
	PROCESS;
	OUT_ULONG(phKey);
	END(C_UnwrapKey);
}

CK_RV C_DeriveKey(S hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hBaseKey, CK_ATTRIBUTE_PTR pTemplate,
                  U ulAttributeCount, CK_OBJECT_HANDLE_PTR phKey)
{
	BEGIN_SESSION(C_DeriveKey, hSession);
	ARG(phKey);
	IN_MECHANISM(pMechanism);
	IN_ULONG(hBaseKey);
	IN_TEMPLATE(pTemplate, ulAttributeCount);
	PROCESS;
	OUT_ULONG(phKey);
	END(C_DeriveKey);
}

CK_RV C_SeedRandom(S hSession, B pSeed, U ulSeedLen)
{
	BEGIN_SESSION(C_SeedRandom, hSession);
	IN_BYTES(pSeed, ulSeedLen);
	PROCESS;
	END(C_SeedRandom);
}

CK_RV C_GenerateRandom(S hSession, B pRandomData, U ulRandomLen)
{
	CK_ULONG got = ulRandomLen;
	BEGIN_SESSION(C_GenerateRandom, hSession);
	ARG(pRandomData || !ulRandomLen);
	IN_ULONG(ulRandomLen);
	PROCESS;
	OUT_BYTES(pRandomData, &got);
	STEP(OK_ && RAN && got != ulRandomLen, rv_ = CKR_DEVICE_ERROR);
	STEP(rv_ == CKR_BUFFER_TOO_SMALL, rv_ = CKR_DEVICE_ERROR);
	END(C_GenerateRandom);
}

CK_RV C_GetFunctionStatus(S hSession)
{
	BEGIN_SESSION(C_GetFunctionStatus, hSession);
	PROCESS;
	END(C_GetFunctionStatus);
}

CK_RV C_CancelFunction(S hSession)
{
	BEGIN_SESSION(C_CancelFunction, hSession);
	PROCESS;
	END(C_CancelFunction);
}

/* ---- v3.0 functions keygridd does not serve (v3.0 Base 5.6, 5.14-5.19) ---- */

#define NOT_SERVED(name, args)                                         \
	CK_RV name args                                                \
	{                                                              \
		CK_RV rv = kg_check_live();                            \
		return rv == CKR_OK ? CKR_FUNCTION_NOT_SUPPORTED : rv; \
	}
#define P CK_VOID_PTR pParameter, U ulParameterLen
#pragma GCC diagnostic ignored "-Wunused-parameter" /* the stubs below look at no argument */

NOT_SERVED(C_LoginUser, (S h, CK_USER_TYPE t, CK_UTF8CHAR_PTR p, U n, CK_UTF8CHAR_PTR u, U un))
NOT_SERVED(C_SessionCancel, (S h, CK_FLAGS f))
NOT_SERVED(C_MessageEncryptInit, (S h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k))
NOT_SERVED(C_EncryptMessage, (S h, P, B a, U an, B p, U pn, B c, UP cn))
NOT_SERVED(C_EncryptMessageBegin, (S h, P, B a, U an))
NOT_SERVED(C_EncryptMessageNext, (S h, P, B p, U pn, B c, UP cn, CK_FLAGS f))
NOT_SERVED(C_MessageEncryptFinal, (S h))
NOT_SERVED(C_MessageDecryptInit, (S h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k))
NOT_SERVED(C_DecryptMessage, (S h, P, B a, U an, B c, U cn, B p, UP pn))
NOT_SERVED(C_DecryptMessageBegin, (S h, P, B a, U an))
NOT_SERVED(C_DecryptMessageNext, (S h, P, B c, U cn, B p, UP pn, CK_FLAGS f))
NOT_SERVED(C_MessageDecryptFinal, (S h))
NOT_SERVED(C_MessageSignInit, (S h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k))
NOT_SERVED(C_SignMessage, (S h, P, B d, U dn, B s, UP sn))
NOT_SERVED(C_SignMessageBegin, (S h, P))
NOT_SERVED(C_SignMessageNext, (S h, P, B d, U dn, B s, UP sn))
NOT_SERVED(C_MessageSignFinal, (S h))
NOT_SERVED(C_MessageVerifyInit, (S h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k))
NOT_SERVED(C_VerifyMessage, (S h, P, B d, U dn, B s, U sn))
NOT_SERVED(C_VerifyMessageBegin, (S h, P))
NOT_SERVED(C_VerifyMessageNext, (S h, P, B d, U dn, B s, U sn))
NOT_SERVED(C_MessageVerifyFinal, (S h))
