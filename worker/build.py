"""What llama.cpp build this worker runs: llama-cpp-python's version, ggml's version and
commit, and the CPU features the build uses (llama_print_system_info), for `llmsup
version` and bug reports. Loads llama_cpp: import it only where that is wanted."""

from __future__ import annotations

import ctypes
import os


def build_info() -> dict:
    import llama_cpp

    ggml = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    info: dict = {"llama_cpp_python": llama_cpp.__version__}
    for name in ("ggml_version", "ggml_commit"):  # in ggml.h since 2025; absent before
        function = getattr(ggml, name, None)
        if function is not None:
            function.restype = ctypes.c_char_p
            info[name] = function().decode()
    system = llama_cpp.llama_print_system_info().decode()
    # "CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 0 | ..." -> the features that are on.
    info["cpu_features"] = [
        part.split("=")[0].split(":")[-1].strip()
        for part in system.split("|")
        if part.strip().endswith("= 1")
    ]
    return info
