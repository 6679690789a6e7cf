/*
 * pkcs11_loadgen: drive any PKCS#11 module with N threads for S seconds per operation.
 *
 *   pkcs11_loadgen --module PATH --pin PIN [--token LABEL] [--threads N] [--seconds S] [--ops LIST]
 *
 * It dlopen()s the module, calls C_Initialize with CKF_OS_LOCKING_OK, finds the
 * token by label (default: the first slot with a token), logs in as the user and
 * prepares session keys in one session: an EC P-256 key pair, an RSA-2048 key
 * pair and an AES-256 key (all CKA_TOKEN=false, so session objects every
 * session of this application sees), plus a data object labelled
 * "loadgen-find" for the find operation. Then, for each operation, N threads
 * each open their own session, wait on a barrier and repeat the operation until
 * S seconds have passed. One line per operation on stdout:
 *
 *   RESULT <op> <threads> <ops_per_second> <ops> <seconds>
 *   RESULT <op> <threads> refused <CK_RV hex> <function>     (when the operation fails)
 *
 * Operations (--ops, comma separated; default all):
 *   ecdsa-p256-sign   C_SignInit + C_Sign, CKM_ECDSA on a 32-byte hash
 *   rsa2048-sign      C_SignInit + C_Sign, CKM_SHA256_RSA_PKCS on 32 bytes
 *   aes256-gcm-1k     C_EncryptInit + C_Encrypt, CKM_AES_GCM, 1 KiB, a fresh 12-byte IV per call
 *   aes256-ecb-1k     C_EncryptInit + C_Encrypt, CKM_AES_ECB, 1 KiB: GCM's two calls and sizes without a
 *                     parameter (p11-kit 0.24 forwards no AES parameter): a reference, not a mode to use
 *   random-32         C_GenerateRandom of 32 bytes
 *   find-label        C_FindObjectsInit + C_FindObjects + C_FindObjectsFinal on CKA_LABEL
 *
 * Build: cc -O2 -Wall -Wextra -Werror -pthread -I/usr/include/p11-kit-1 -o pkcs11_loadgen pkcs11_loadgen.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <getopt.h>
#include <p11-kit/pkcs11.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_THREADS 256
#define FIND_LABEL "loadgen-find"

static CK_FUNCTION_LIST_PTR p11;
static CK_SLOT_ID slot;
static CK_OBJECT_HANDLE ec_key, rsa_key, aes_key;
static atomic_bool stop_flag;
static pthread_barrier_t barrier;

typedef struct {
    int index;
    const char *op;
    unsigned long long count;
    CK_RV rv;
    const char *failed_call;
    double end;
} worker_t;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what, CK_RV rv)
{
    fprintf(stderr, "pkcs11_loadgen: %s failed: CK_RV 0x%lx\n", what, (unsigned long)rv);
    exit(2);
}

#define CHECK(call)                      \
    do {                                 \
        CK_RV rv_ = (call);              \
        if (rv_ != CKR_OK)               \
            die(#call, rv_);             \
    } while (0)

static CK_SLOT_ID find_slot(const char *label)
{
    CK_ULONG count = 0;
    CHECK(p11->C_GetSlotList(CK_TRUE, NULL, &count));
    if (count == 0)
        die("C_GetSlotList (no token present)", CKR_TOKEN_NOT_PRESENT);
    CK_SLOT_ID *slots = calloc(count, sizeof *slots);
    if (!slots)
        die("calloc", CKR_HOST_MEMORY);
    CHECK(p11->C_GetSlotList(CK_TRUE, slots, &count));
    for (CK_ULONG i = 0; i < count; i++) {
        CK_TOKEN_INFO info;
        if (p11->C_GetTokenInfo(slots[i], &info) != CKR_OK)
            continue;
        size_t n = sizeof info.label;
        while (n > 0 && info.label[n - 1] == ' ')
            n--;
        if (!label || (strlen(label) == n && memcmp(info.label, label, n) == 0)) {
            CK_SLOT_ID found = slots[i];
            free(slots);
            return found;
        }
    }
    fprintf(stderr, "pkcs11_loadgen: no token labelled %s\n", label ? label : "(any)");
    exit(2);
}

static void prepare_keys(CK_SESSION_HANDLE s)
{
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    /* prime256v1 */
    static CK_BYTE p256[] = {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};
    CK_OBJECT_HANDLE pub;

    CK_MECHANISM ec_gen = {CKM_EC_KEY_PAIR_GEN, NULL, 0};
    CK_ATTRIBUTE ec_pub[] = {{CKA_TOKEN, &no, sizeof no}, {CKA_EC_PARAMS, p256, sizeof p256},
                             {CKA_VERIFY, &yes, sizeof yes}};
    CK_ATTRIBUTE ec_priv[] = {{CKA_TOKEN, &no, sizeof no}, {CKA_SIGN, &yes, sizeof yes},
                              {CKA_SENSITIVE, &yes, sizeof yes}, {CKA_LABEL, "loadgen-ec", 10}};
    CHECK(p11->C_GenerateKeyPair(s, &ec_gen, ec_pub, 3, ec_priv, 4, &pub, &ec_key));

    CK_ULONG bits = 2048;
    CK_BYTE exponent[] = {0x01, 0x00, 0x01};
    CK_MECHANISM rsa_gen = {CKM_RSA_PKCS_KEY_PAIR_GEN, NULL, 0};
    CK_ATTRIBUTE rsa_pub[] = {{CKA_TOKEN, &no, sizeof no}, {CKA_MODULUS_BITS, &bits, sizeof bits},
                              {CKA_PUBLIC_EXPONENT, exponent, sizeof exponent}, {CKA_VERIFY, &yes, sizeof yes}};
    CK_ATTRIBUTE rsa_priv[] = {{CKA_TOKEN, &no, sizeof no}, {CKA_SIGN, &yes, sizeof yes},
                               {CKA_SENSITIVE, &yes, sizeof yes}, {CKA_LABEL, "loadgen-rsa", 11}};
    CHECK(p11->C_GenerateKeyPair(s, &rsa_gen, rsa_pub, 4, rsa_priv, 4, &pub, &rsa_key));

    CK_ULONG aes_len = 32;
    CK_MECHANISM aes_gen = {CKM_AES_KEY_GEN, NULL, 0};
    CK_ATTRIBUTE aes_tmpl[] = {{CKA_TOKEN, &no, sizeof no}, {CKA_VALUE_LEN, &aes_len, sizeof aes_len},
                               {CKA_ENCRYPT, &yes, sizeof yes}, {CKA_DECRYPT, &yes, sizeof yes},
                               {CKA_SENSITIVE, &yes, sizeof yes}, {CKA_LABEL, "loadgen-aes", 11}};
    CHECK(p11->C_GenerateKey(s, &aes_gen, aes_tmpl, 6, &aes_key));

    CK_OBJECT_CLASS data_class = CKO_DATA;
    CK_OBJECT_HANDLE data;
    CK_ATTRIBUTE data_tmpl[] = {{CKA_CLASS, &data_class, sizeof data_class},
                                {CKA_TOKEN, &no, sizeof no},
                                {CKA_LABEL, FIND_LABEL, sizeof FIND_LABEL - 1},
                                {CKA_VALUE, "x", 1}};
    CHECK(p11->C_CreateObject(s, data_tmpl, 4, &data));
}

/* One operation; returns CKR_OK or the failing CK_RV with *call set. */
static CK_RV run_once(const char *op, CK_SESSION_HANDLE s, int index, unsigned long long n, const char **call)
{
    static const CK_BYTE hash[32] = {0x4b, 0x65, 0x79, 0x47, 0x72, 0x69, 0x64};
    static const CK_BYTE plaintext[1024];
    CK_BYTE out[2048];
    CK_ULONG out_len = sizeof out;
    CK_RV rv;

    if (strcmp(op, "ecdsa-p256-sign") == 0 || strcmp(op, "rsa2048-sign") == 0) {
        int ec = op[0] == 'e';
        CK_MECHANISM m = {ec ? CKM_ECDSA : CKM_SHA256_RSA_PKCS, NULL, 0};
        *call = "C_SignInit";
        if ((rv = p11->C_SignInit(s, &m, ec ? ec_key : rsa_key)) != CKR_OK)
            return rv;
        *call = "C_Sign";
        return p11->C_Sign(s, (CK_BYTE_PTR)hash, sizeof hash, out, &out_len);
    }
    if (strcmp(op, "aes256-gcm-1k") == 0) {
        CK_BYTE iv[12];
        uint32_t tid = (uint32_t)index;
        uint64_t counter = n;
        memcpy(iv, &tid, 4);
        memcpy(iv + 4, &counter, 8); /* unique per (thread, call): never reused with this key */
        CK_GCM_PARAMS gcm = {iv, sizeof iv, 96, NULL, 0, 128};
        CK_MECHANISM m = {CKM_AES_GCM, &gcm, sizeof gcm};
        *call = "C_EncryptInit";
        if ((rv = p11->C_EncryptInit(s, &m, aes_key)) != CKR_OK)
            return rv;
        *call = "C_Encrypt";
        rv = p11->C_Encrypt(s, (CK_BYTE_PTR)plaintext, sizeof plaintext, out, &out_len);
        if (rv == CKR_OK && out_len != sizeof plaintext + 16)
            rv = CKR_GENERAL_ERROR;
        return rv;
    }
    if (strcmp(op, "aes256-ecb-1k") == 0) {
        CK_MECHANISM m = {CKM_AES_ECB, NULL, 0};
        *call = "C_EncryptInit";
        if ((rv = p11->C_EncryptInit(s, &m, aes_key)) != CKR_OK)
            return rv;
        *call = "C_Encrypt";
        rv = p11->C_Encrypt(s, (CK_BYTE_PTR)plaintext, sizeof plaintext, out, &out_len);
        if (rv == CKR_OK && out_len != sizeof plaintext)
            rv = CKR_GENERAL_ERROR;
        return rv;
    }
    if (strcmp(op, "random-32") == 0) {
        *call = "C_GenerateRandom";
        return p11->C_GenerateRandom(s, out, 32);
    }
    if (strcmp(op, "find-label") == 0) {
        CK_ATTRIBUTE tmpl[] = {{CKA_LABEL, FIND_LABEL, sizeof FIND_LABEL - 1}};
        CK_OBJECT_HANDLE found[4];
        CK_ULONG count = 0;
        *call = "C_FindObjectsInit";
        if ((rv = p11->C_FindObjectsInit(s, tmpl, 1)) != CKR_OK)
            return rv;
        *call = "C_FindObjects";
        rv = p11->C_FindObjects(s, found, 4, &count);
        CK_RV final = p11->C_FindObjectsFinal(s);
        if (rv != CKR_OK)
            return rv;
        *call = "C_FindObjectsFinal";
        if (final != CKR_OK)
            return final;
        *call = "C_FindObjects (count)";
        return count == 1 ? CKR_OK : CKR_GENERAL_ERROR;
    }
    *call = "unknown operation";
    return CKR_ARGUMENTS_BAD;
}

static void *worker_main(void *arg)
{
    worker_t *w = arg;
    CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
    w->failed_call = "C_OpenSession";
    w->rv = p11->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &s);
    /* A warm-up call outside the measurement: a failure refuses the whole operation. */
    if (w->rv == CKR_OK)
        w->rv = run_once(w->op, s, w->index, 0, &w->failed_call);
    pthread_barrier_wait(&barrier);
    while (w->rv == CKR_OK && !atomic_load_explicit(&stop_flag, memory_order_relaxed)) {
        w->rv = run_once(w->op, s, w->index, w->count + 1, &w->failed_call);
        if (w->rv == CKR_OK)
            w->count++;
    }
    w->end = now();
    if (s != CK_INVALID_HANDLE)
        p11->C_CloseSession(s);
    return NULL;
}

static void run_op(const char *op, int threads, double seconds)
{
    pthread_t tids[MAX_THREADS];
    worker_t workers[MAX_THREADS];
    atomic_store(&stop_flag, false);
    pthread_barrier_init(&barrier, NULL, (unsigned)threads + 1);
    for (int i = 0; i < threads; i++) {
        workers[i] = (worker_t){.index = i, .op = op};
        if (pthread_create(&tids[i], NULL, worker_main, &workers[i]) != 0)
            die("pthread_create", CKR_HOST_MEMORY);
    }
    pthread_barrier_wait(&barrier);
    double start = now();
    struct timespec pause = {(time_t)seconds, (long)((seconds - (double)(time_t)seconds) * 1e9)};
    nanosleep(&pause, NULL);
    atomic_store(&stop_flag, true);
    unsigned long long total = 0;
    double end = start;
    const worker_t *failed = NULL;
    for (int i = 0; i < threads; i++) {
        pthread_join(tids[i], NULL);
        total += workers[i].count;
        if (workers[i].end > end)
            end = workers[i].end;
        if (workers[i].rv != CKR_OK && !failed)
            failed = &workers[i];
    }
    pthread_barrier_destroy(&barrier);
    if (failed)
        printf("RESULT %s %d refused 0x%lx %s\n", op, threads, (unsigned long)failed->rv, failed->failed_call);
    else
        printf("RESULT %s %d %.1f %llu %.3f\n", op, threads, (double)total / (end - start), total, end - start);
    fflush(stdout);
}

static void usage(void)
{
    fprintf(stderr, "usage: pkcs11_loadgen --module PATH --pin PIN [--token LABEL] [--threads N] "
                    "[--seconds S] [--ops ecdsa-p256-sign,rsa2048-sign,aes256-gcm-1k,aes256-ecb-1k,random-32,find-label]\n");
    exit(64);
}

int main(int argc, char **argv)
{
    const char *module = NULL, *pin = NULL, *token = NULL;
    char *ops = strdup("ecdsa-p256-sign,rsa2048-sign,aes256-gcm-1k,aes256-ecb-1k,random-32,find-label");
    int threads = 1;
    double seconds = 2.0;
    static const struct option longopts[] = {
        {"module", required_argument, NULL, 'm'}, {"pin", required_argument, NULL, 'p'},
        {"token", required_argument, NULL, 't'},  {"threads", required_argument, NULL, 'n'},
        {"seconds", required_argument, NULL, 's'}, {"ops", required_argument, NULL, 'o'},
        {NULL, 0, NULL, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "m:p:t:n:s:o:", longopts, NULL)) != -1) {
        switch (c) {
        case 'm': module = optarg; break;
        case 'p': pin = optarg; break;
        case 't': token = optarg; break;
        case 'n': threads = atoi(optarg); break;
        case 's': seconds = atof(optarg); break;
        case 'o': free(ops); ops = strdup(optarg); break;
        default: usage();
        }
    }
    if (!module || !pin || threads < 1 || threads > MAX_THREADS || seconds <= 0 || !ops)
        usage();

    void *handle = dlopen(module, RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        fprintf(stderr, "pkcs11_loadgen: dlopen %s: %s\n", module, dlerror());
        return 2;
    }
    CK_C_GetFunctionList get_list = (CK_C_GetFunctionList)dlsym(handle, "C_GetFunctionList");
    if (!get_list) {
        fprintf(stderr, "pkcs11_loadgen: %s has no C_GetFunctionList\n", module);
        return 2;
    }
    CHECK(get_list(&p11));
    CK_C_INITIALIZE_ARGS init = {NULL, NULL, NULL, NULL, CKF_OS_LOCKING_OK, NULL};
    CHECK(p11->C_Initialize(&init));
    slot = find_slot(token);

    CK_SESSION_HANDLE main_session;
    CHECK(p11->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &main_session));
    CK_RV rv = p11->C_Login(main_session, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin));
    if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN)
        die("C_Login", rv);
    prepare_keys(main_session);

    for (char *save = NULL, *op = strtok_r(ops, ",", &save); op; op = strtok_r(NULL, ",", &save))
        run_op(op, threads, seconds);

    p11->C_Logout(main_session);
    p11->C_CloseSession(main_session);
    p11->C_Finalize(NULL);
    free(ops);
    return 0;
}
