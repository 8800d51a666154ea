// main only wires: everything else is in the libraries, where the tests reach it.
#include "kmsplugin/cli/commands.h"

int main(int argc, char** argv) { return kmsplugin::cli::Main(argc, argv); }
