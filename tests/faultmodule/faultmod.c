/* faultmod.c - a PKCS#11 module that misbehaves on request, for KeyGrid's worker fault tests.
 *
 * It dlopen()s the module named by KEYGRID_FAULT_TARGET (default SoftHSM2),
 * copies that module's function list and replaces C_Sign: data starting with
 * "hang" blocks the calling thread forever, data starting with "crash" calls
 * abort(); everything else is forwarded unchanged. With KEYGRID_FAULT_CANT_LOCK
 * set, C_Initialize answers CKR_CANT_LOCK to a request for CKF_OS_LOCKING_OK
 * (a module that must be called by one thread). Only C_GetFunctionList is
 * exported. tests/integration/test_pkcs11_worker.py builds it (build_fault_module):
 *   cc -shared -fPIC -Wall -Wextra -Werror -I/usr/include/p11-kit-1 -o libfaultmod.so faultmod.c
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>

#define DEFAULT_TARGET "/usr/lib/softhsm/libsofthsm2.so"

static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static CK_RV load_rv = CKR_GENERAL_ERROR;
static CK_FUNCTION_LIST_PTR target;
static CK_FUNCTION_LIST faulty;

static int starts_with(CK_BYTE_PTR data, CK_ULONG len, const char *prefix)
{
	size_t n = strlen(prefix);

	return data != NULL && len >= n && memcmp(data, prefix, n) == 0;
}

static CK_RV fault_sign(CK_SESSION_HANDLE session, CK_BYTE_PTR data, CK_ULONG len, CK_BYTE_PTR sig,
                        CK_ULONG_PTR sig_len)
{
	if (starts_with(data, len, "hang")) {
		for (;;)
			pause();
	}
	if (starts_with(data, len, "crash")) abort();
	return target->C_Sign(session, data, len, sig, sig_len);
}

static CK_RV fault_initialize(CK_VOID_PTR init_args)
{
	const char *cant_lock = getenv("KEYGRID_FAULT_CANT_LOCK");
	CK_C_INITIALIZE_ARGS_PTR args = init_args;

	if (cant_lock != NULL && *cant_lock != '\0' && args != NULL && (args->flags & CKF_OS_LOCKING_OK))
		return CKR_CANT_LOCK;
	return target->C_Initialize(init_args);
}

static void load(void)
{
	const char *path = getenv("KEYGRID_FAULT_TARGET");
	CK_C_GetFunctionList get_list;
	void *handle;

	if (path == NULL || *path == '\0') path = DEFAULT_TARGET;
	handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	if (handle == NULL) return;
	*(void **)&get_list = dlsym(handle, "C_GetFunctionList");
	if (get_list == NULL) return;
	load_rv = get_list(&target);
	if (load_rv != CKR_OK) return;
	if (target == NULL) {
		load_rv = CKR_GENERAL_ERROR;
		return;
	}
	memcpy(&faulty, target, sizeof(faulty));
	faulty.C_GetFunctionList = C_GetFunctionList;
	faulty.C_Initialize = fault_initialize;
	faulty.C_Sign = fault_sign;
}

CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list)
{
	if (list == NULL) return CKR_ARGUMENTS_BAD;
	if (pthread_once(&load_once, load) != 0) return CKR_GENERAL_ERROR;
	if (load_rv != CKR_OK) return load_rv;
	*list = &faulty;
	return CKR_OK;
}
