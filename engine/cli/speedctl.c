#include <stdio.h>
int main(void) { puts("speedctl"); return 0; }
