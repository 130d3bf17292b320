/* The counters behind check.h's macros: one pair per test process, however many objects
 * (the test's own source and the helper libraries) run checks. */
#include "check.h"

_Atomic int check_failures_;
_Atomic int check_count_;
