#!/usr/bin/env bash
# Print the CMake flags llama.cpp is built with here: CPU features from /proc/cpuinfo,
# never GGML_NATIVE (native detection turns on ggml's AMX kernels, which segfault on the
# first decode on our machines). Used by tools/setup.sh and perf/build-llama-server.sh.
# Names as /proc/cpuinfo spells them (avx512vbmi, but avx512_vnni and avx512_bf16).
set -euo pipefail
cpu_flags=$(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2)
has() { [[ " $cpu_flags " == *" $1 "* ]] && echo ON || echo OFF; }
args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
args+=" -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma)"
args+=" -DGGML_F16C=$(has f16c) -DGGML_BMI2=$(has bmi2)"
args+=" -DGGML_AVX512=$(has avx512f) -DGGML_AVX512_VBMI=$(has avx512vbmi)"
args+=" -DGGML_AVX512_VNNI=$(has avx512_vnni) -DGGML_AVX512_BF16=$(has avx512_bf16)"
args+=" -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
echo "$args"
