"""`llmsup --version` and `llmsup version --json` (issue 27, item 1)."""

from __future__ import annotations

from importlib import metadata

import llama_cpp
import orjson

from llmsup.protocol import constants as C
from tests.conftest import llmsup


def test_version_json_names_llmsup_the_protocol_and_the_llama_cpp_build():
    out = llmsup("version", "--json", timeout=60)
    assert out.returncode == 0, out.stderr
    v = orjson.loads(out.stdout)
    assert v["llmsup"] == metadata.version("llmsup")
    assert v["protocol"] == C.VERSION.decode()
    assert v["llama_cpp_python"] == llama_cpp.__version__
    assert v["ggml_version"] and v["ggml_commit"]
    # The CPU features the build uses: tools/setup.sh builds with the CPU's AVX2 where it has it.
    cpu_flags = open("/proc/cpuinfo").read().split("flags", 1)[1].split("\n", 1)[0].split()
    assert ("AVX2" in v["cpu_features"]) == ("avx2" in cpu_flags)


def test_dash_dash_version_is_one_line_and_exits_0():
    out = llmsup("--version", timeout=60)
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.splitlines()
    assert line.startswith(f"llmsup {metadata.version('llmsup')} (protocol {C.VERSION.decode()}")
    assert f"llama-cpp-python {llama_cpp.__version__}" in line
