/* check.h - the CHECK macro of the C tests: count a check, report a failure with its location. */
#ifndef KEYGRID_TEST_CHECK_H
#define KEYGRID_TEST_CHECK_H

#include <stdio.h>

static int failures, checks;
#define CHECK(cond, ...)                                                                \
	do {                                                                            \
		checks++;                                                               \
		if (!(cond)) {                                                          \
			failures++;                                                     \
			fprintf(stderr, "%s:%d: FAIL %s: ", __FILE__, __LINE__, #cond); \
			fprintf(stderr, __VA_ARGS__);                                   \
			fputc('\n', stderr);                                            \
		}                                                                       \
	} while (0)

#endif
