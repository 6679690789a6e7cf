/* module.c - entry points, initialisation, locking and fork detection.
 *
 * PKCS#11 v2.40 Base 5.4 (C_Initialize, C_Finalize, C_GetFunctionList) and
 * v3.0 Base 5.4 (C_GetInterfaceList, C_GetInterface).
 * - CK_C_INITIALIZE_ARGS: pReserved must be NULL; the four mutex callbacks
 *   are all given or all NULL. The module never creates threads, so
 *   CKF_LIBRARY_CANT_CREATE_OS_THREADS needs nothing. With callbacks and
 *   without CKF_OS_LOCKING_OK the module state is guarded by the
 *   application's mutex, otherwise by a pthread mutex.
 * - Fork: C_Initialize records getpid(); every call checks it. In a child
 *   every call answers CKR_CRYPTOKI_NOT_INITIALIZED until the child calls
 *   C_Initialize, which closes the inherited descriptors (nothing is sent on
 *   the parent's connections) and connects anew. The atfork handler only
 *   re-initialises the mutexes: no I/O.
 */
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "keygrid.h"

int kg_debug;

static struct {
	int initialized;
	pid_t pid;
	CK_C_INITIALIZE_ARGS app; /* the application's mutex callbacks, when used */
	void *app_mutex;
} M;

static pthread_mutex_t state_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t life_mutex = PTHREAD_MUTEX_INITIALIZER; /* C_Initialize / C_Finalize */

static void after_fork_child(void)
{
	pthread_mutex_init(&state_mutex, NULL);
	pthread_mutex_init(&life_mutex, NULL);
}

int kg_lock(void)
{
	if (M.app_mutex) return M.app.LockMutex(M.app_mutex) == CKR_OK ? CKR_OK : CKR_GENERAL_ERROR;
	return pthread_mutex_lock(&state_mutex) ? CKR_GENERAL_ERROR : CKR_OK;
}

void kg_unlock(void)
{
	if (M.app_mutex)
		M.app.UnlockMutex(M.app_mutex);
	else
		pthread_mutex_unlock(&state_mutex);
}

void kg_log(const char *fmt, ...)
{
	char line[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	fprintf(stderr, "keygrid-pkcs11[%d]: %s\n", (int)getpid(), line);
}

CK_RV kg_check_live(void)
{
	return M.initialized && M.pid == getpid() ? CKR_OK : CKR_CRYPTOKI_NOT_INITIALIZED;
}

static CK_RV check_args(const CK_C_INITIALIZE_ARGS *a)
{
	int given = !!a->CreateMutex + !!a->DestroyMutex + !!a->LockMutex + !!a->UnlockMutex;
	if (a->pReserved || (given != 0 && given != 4)) return CKR_ARGUMENTS_BAD;
	return CKR_OK;
}

CK_RV C_Initialize(CK_VOID_PTR pInitArgs)
{
	static int atfork_done;
	struct kg_config cfg;
	const CK_C_INITIALIZE_ARGS *args = pInitArgs;
	CK_RV rv = args ? check_args(args) : CKR_OK;
	if (rv != CKR_OK) return rv;
	pthread_mutex_lock(&life_mutex);
	if (M.initialized && M.pid == getpid()) {
		pthread_mutex_unlock(&life_mutex);
		return CKR_CRYPTOKI_ALREADY_INITIALIZED;
	}
	if (M.initialized) { /* a forked child: forget the parent's state */
		kg_transport_close();
		memset(&M, 0, sizeof(M));
	}
	if (!atfork_done) atfork_done = !pthread_atfork(NULL, NULL, after_fork_child);
	if (args && args->CreateMutex && !(args->flags & CKF_OS_LOCKING_OK)) {
		M.app = *args;
		if ((rv = args->CreateMutex(&M.app_mutex)) != CKR_OK) {
			memset(&M, 0, sizeof(M));
			pthread_mutex_unlock(&life_mutex);
			return rv;
		}
	}
	kg_config_load(&cfg);
	kg_debug = cfg.debug;
	M.pid = getpid();
	M.initialized = 1;
	KG_DEBUG("C_Initialize: socket %s", cfg.socket);
	kg_transport_init(&cfg);
	pthread_mutex_unlock(&life_mutex);
	kg_transport_connect(); /* I/O outside the lock */
	return CKR_OK;
}

CK_RV C_Finalize(CK_VOID_PTR pReserved)
{
	CK_RV rv = CKR_OK;
	if (pReserved) return CKR_ARGUMENTS_BAD;
	pthread_mutex_lock(&life_mutex);
	if (!M.initialized) {
		rv = CKR_CRYPTOKI_NOT_INITIALIZED;
	} else if (M.pid != getpid()) { /* a child: drop the inherited descriptors only */
		kg_transport_close();
		memset(&M, 0, sizeof(M));
		rv = CKR_CRYPTOKI_NOT_INITIALIZED;
	} else {
		KG_DEBUG("C_Finalize");
		kg_transport_close();
		if (M.app_mutex) M.app.DestroyMutex(M.app_mutex);
		memset(&M, 0, sizeof(M));
	}
	pthread_mutex_unlock(&life_mutex);
	return rv;
}

/* ---- function tables ---- */

#define V2_FUNCTIONS                                                                                                  \
	C_Initialize, C_Finalize, C_GetInfo, C_GetFunctionList, C_GetSlotList, C_GetSlotInfo, C_GetTokenInfo,         \
	        C_GetMechanismList, C_GetMechanismInfo, C_InitToken, C_InitPIN, C_SetPIN, C_OpenSession,              \
	        C_CloseSession, C_CloseAllSessions, C_GetSessionInfo, C_GetOperationState, C_SetOperationState,       \
	        C_Login, C_Logout, C_CreateObject, C_CopyObject, C_DestroyObject, C_GetObjectSize,                    \
	        C_GetAttributeValue, C_SetAttributeValue, C_FindObjectsInit, C_FindObjects, C_FindObjectsFinal,       \
	        C_EncryptInit, C_Encrypt, C_EncryptUpdate, C_EncryptFinal, C_DecryptInit, C_Decrypt, C_DecryptUpdate, \
	        C_DecryptFinal, C_DigestInit, C_Digest, C_DigestUpdate, C_DigestKey, C_DigestFinal, C_SignInit,       \
	        C_Sign, C_SignUpdate, C_SignFinal, C_SignRecoverInit, C_SignRecover, C_VerifyInit, C_Verify,          \
	        C_VerifyUpdate, C_VerifyFinal, C_VerifyRecoverInit, C_VerifyRecover, C_DigestEncryptUpdate,           \
	        C_DecryptDigestUpdate, C_SignEncryptUpdate, C_DecryptVerifyUpdate, C_GenerateKey, C_GenerateKeyPair,  \
	        C_WrapKey, C_UnwrapKey, C_DeriveKey, C_SeedRandom, C_GenerateRandom, C_GetFunctionStatus,             \
	        C_CancelFunction, C_WaitForSlotEvent

static CK_FUNCTION_LIST list_v2 = {{2, 40}, V2_FUNCTIONS};

#define F(name) (kg_fn) name
static kg_function_list_3_0 list_v3 = {
        {{3, 0}, V2_FUNCTIONS},
        {F(C_GetInterfaceList),    F(C_GetInterface),        F(C_LoginUser),           F(C_SessionCancel),
         F(C_MessageEncryptInit),  F(C_EncryptMessage),      F(C_EncryptMessageBegin), F(C_EncryptMessageNext),
         F(C_MessageEncryptFinal), F(C_MessageDecryptInit),  F(C_DecryptMessage),      F(C_DecryptMessageBegin),
         F(C_DecryptMessageNext),  F(C_MessageDecryptFinal), F(C_MessageSignInit),     F(C_SignMessage),
         F(C_SignMessageBegin),    F(C_SignMessageNext),     F(C_MessageSignFinal),    F(C_MessageVerifyInit),
         F(C_VerifyMessage),       F(C_VerifyMessageBegin),  F(C_VerifyMessageNext),   F(C_MessageVerifyFinal)},
};

static CK_CHAR interface_name[] = "PKCS 11";
static CK_INTERFACE interfaces[] = {
        {interface_name, &list_v3, 0},
        {interface_name, &list_v2, 0},
};
#define N_INTERFACES (sizeof(interfaces) / sizeof(interfaces[0]))

CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR ppFunctionList)
{
	if (!ppFunctionList) return CKR_ARGUMENTS_BAD;
	*ppFunctionList = &list_v2;
	return CKR_OK;
}

KG_EXPORT CK_RV C_GetInterfaceList(CK_INTERFACE_PTR pInterfacesList, CK_ULONG_PTR pulCount)
{
	if (!pulCount) return CKR_ARGUMENTS_BAD;
	if (!pInterfacesList) {
		*pulCount = N_INTERFACES;
		return CKR_OK;
	}
	if (*pulCount < N_INTERFACES) {
		*pulCount = N_INTERFACES;
		return CKR_BUFFER_TOO_SMALL;
	}
	memcpy(pInterfacesList, interfaces, sizeof(interfaces));
	*pulCount = N_INTERFACES;
	return CKR_OK;
}

KG_EXPORT CK_RV C_GetInterface(CK_UTF8CHAR_PTR pInterfaceName, CK_VERSION_PTR pVersion,
                               CK_INTERFACE_PTR_PTR ppInterface, CK_FLAGS flags)
{
	if (!ppInterface) return CKR_ARGUMENTS_BAD;
	if (pInterfaceName && strcmp((const char *)pInterfaceName, (const char *)interface_name))
		return CKR_ARGUMENTS_BAD;
	for (size_t i = 0; i < N_INTERFACES; i++) {
		const CK_VERSION *v = interfaces[i].pFunctionList;
		if (pVersion && (pVersion->major != v->major || pVersion->minor != v->minor)) continue;
		if ((flags & interfaces[i].flags) != flags) continue;
		*ppInterface = &interfaces[i];
		return CKR_OK;
	}
	return CKR_ARGUMENTS_BAD;
}
