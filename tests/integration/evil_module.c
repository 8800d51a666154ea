/* A shared library an attacker would like root to load: its constructor runs at dlopen, before any PKCS#11 call,
 * and leaves a marker file (path from $KMS_EVIL_MARKER) with the uid it ran as. Test-only; never installed. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

__attribute__((constructor)) static void ran(void) {
  const char* marker = getenv("KMS_EVIL_MARKER");
  if (marker != NULL) {
    FILE* f = fopen(marker, "w");
    if (f != NULL) {
      fprintf(f, "uid=%d\n", (int)geteuid());
      fclose(f);
    }
  }
}

int C_GetFunctionList(void** list) {
  (void)list;
  return 0x5; /* CKR_GENERAL_ERROR */
}
