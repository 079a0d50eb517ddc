"""The CUDA architecture list of the build (cmake/DipExtCudaArchs.cmake), run through `cmake -P`: no compiler,
no CUDA and no torch needed. scripts/check_cuda_arch_lists.sh checks the same spellings end to end (configure
against the CUDA build of torch + one kernel compiled); the full CUDA build is scripts/check_cuda_build.sh.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

import dip_ext

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULE = ROOT / "cmake" / "DipExtCudaArchs.cmake"


def _cmake() -> str:
    here = pathlib.Path(sys.executable).parent / "cmake"  # the venv's (PyPI) cmake first
    found = str(here) if here.exists() else shutil.which("cmake")
    if not found:
        pytest.skip("no cmake")
    return found


def run_cmake(body: str, tmp_path) -> subprocess.CompletedProcess:
    script = tmp_path / "t.cmake"
    script.write_text(f"cmake_minimum_required(VERSION 3.20)\ninclude({MODULE.as_posix()})\n{body}\n")
    return subprocess.run([_cmake(), "-P", str(script)], capture_output=True, text=True)


def normalize(arch_list: str, tmp_path) -> tuple:
    """(normalized list, machine code, PTX) as the build computes them."""
    p = run_cmake(f'dip_ext_normalize_arch_list("{arch_list}" out)\n'
                  'dip_ext_arch_list_codes("${out}" sass ptx)\n'
                  'message(NOTICE "RESULT|${out}|${sass}|${ptx}")', tmp_path)
    assert p.returncode == 0, p.stderr
    line = next(ln for ln in p.stderr.splitlines() if ln.startswith("RESULT|"))
    _, out, sass, ptx = line.split("|")
    return out, sass.split(), ptx.split()


@pytest.mark.parametrize("spelling,expected", [
    ("8.0;9.0+PTX", ("8.0;9.0+PTX", ["sm_80", "sm_90"], ["compute_90"])),  # torch's documented form
    ("8.0 9.0a", ("8.0;9.0a", ["sm_80", "sm_90a"], [])),                   # space-separated
    ("  7.5,8.6+PTX ;; 10.0(9.0) ", ("7.5;8.6+PTX;10.0(9.0)", ["sm_75", "sm_86", "sm_100"], ["compute_86"])),
    ("8.0;8.0", ("8.0", ["sm_80"], [])),
    ("Common", ("Common", [], [])),  # torch decides; build_info then reports what torch's flags say
])
def test_arch_list_spellings(spelling, expected, tmp_path):
    assert normalize(spelling, tmp_path) == expected


@pytest.mark.parametrize("bad,message", [("8.0;sm_90", "cannot read 'sm_90'"), ("9", "cannot read '9'"),
                                         (" ; ", "no architecture"), ("8.0;Common", "must be the whole list")])
def test_bad_arch_list_is_a_clear_configure_error(bad, message, tmp_path):
    p = run_cmake(f'dip_ext_normalize_arch_list("{bad}" out)', tmp_path)
    assert p.returncode != 0
    assert "TORCH_CUDA_ARCH_LIST" in p.stderr and message in p.stderr


def default_list(torch_archs: str, nvcc: str, visible: str, tmp_path) -> str:
    p = run_cmake(f'dip_ext_default_arch_list("{torch_archs}" "{nvcc}" "{visible}" out)\n'
                  'message(NOTICE "RESULT|${out}")', tmp_path)
    assert p.returncode == 0, p.stderr
    return next(ln for ln in p.stderr.splitlines() if ln.startswith("RESULT|")).split("|")[1]


CU130_TORCH = "sm_75;sm_80;sm_86;sm_90;sm_100;sm_120"
NVCC13 = "sm_75;sm_80;sm_86;sm_87;sm_88;sm_89;sm_90;sm_100;sm_110;sm_103;sm_120;sm_121"


@pytest.mark.parametrize("torch_archs,nvcc,visible,expected", [
    # no GPU at build time: PTX of the oldest arch both support (every later GPU JITs it) + sm_80 + sm_90a code
    (CU130_TORCH, NVCC13, "", "7.5+PTX;8.0;9.0a"),
    # an older torch (cu126: sm_50..sm_90) with CUDA 13's nvcc: the oldest arch nvcc still builds
    ("sm_50;sm_60;sm_70;sm_75;sm_80;sm_86;sm_90", NVCC13, "", "7.5+PTX;8.0;9.0a"),
    # visible GPUs add their own machine code (an H100's 9.0 is covered by 9.0a)
    (CU130_TORCH, NVCC13, "8.9;9.0", "7.5+PTX;8.0;9.0a;8.9"),
    (CU130_TORCH, NVCC13, "12.0", "7.5+PTX;8.0;9.0a;12.0"),
    # nothing known: sm_80 PTX + sm_90a
    ("", "", "", "8.0+PTX;9.0a"),
])
def test_default_arch_list_is_portable(torch_archs, nvcc, visible, expected, tmp_path):
    got = default_list(torch_archs, nvcc, visible, tmp_path)
    assert got == expected
    assert got.split(";")[0].endswith("+PTX")  # the portable part: PTX of the oldest arch comes first


def test_build_info_reports_the_archs():
    info = dip_ext.build_info()
    assert {"cuda_archs", "cuda_arch_source", "cuda_sass", "cuda_ptx"} <= set(info)
    assert isinstance(info["cuda_sass"], list) and isinstance(info["cuda_ptx"], list)
    if info["cuda"]:
        assert info["cuda_sass"] and all(a.startswith("sm_") for a in info["cuda_sass"])
        assert all(a.startswith("compute_") for a in info["cuda_ptx"])
        assert info["cuda_arch_source"] in ("TORCH_CUDA_ARCH_LIST", "default")
        if info["cuda_arch_source"] == "default":
            assert info["cuda_ptx"], "the default build must carry PTX for later GPUs"
    else:
        assert info["cuda_archs"] is None and info["cuda_sass"] == [] and info["cuda_ptx"] == []
