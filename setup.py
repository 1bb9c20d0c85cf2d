"""Build hook: compile the BPF programs (`make bpf`) so sdists/wheels carry the .bpf.o objects,
and the tcp_splice hand-over extension (sniproxy.ebpf._handover, issue 14).

A user installing the wheel needs libbpf1 at run time, not clang. The extension needs gcc and
the Python headers at build time (python3-dev); the proxy runs without it (the Python
hand-over), so a failed compile is reported, not fatal.
"""
import shutil
import subprocess
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
BPF_DIR = ROOT / "src" / "sniproxy" / "ebpf" / "bpf"


class BuildPyWithBpf(build_py):
    def run(self):
        sources = sorted(BPF_DIR.glob("*.bpf.c"))
        if sources and shutil.which("clang") and shutil.which("make"):
            subprocess.run(["make", "-C", str(ROOT), "-s", "bpf"], check=True)
        missing = [s.name for s in sources if not s.with_suffix("").with_suffix(".bpf.o").exists()]
        if missing:
            raise SystemExit(
                f"BPF objects missing for {', '.join(missing)}: install clang, make, bpftool and "
                "libbpf-dev (Debian: apt-get install clang make bpftool libbpf-dev) and build again")
        super().run()


class OptionalBuildExt(build_ext):
    """The compiled hand-over is an optimisation: without a compiler or python3-dev the
    package still installs and the hand-over runs in Python (/status says why)."""

    def run(self):
        try:
            super().run()
        except Exception as exc:       # distutils/setuptools raise several error types
            print(f"warning: sniproxy.ebpf._handover not built ({exc}); the tcp_splice "
                  "hand-over will run in Python (install gcc and python3-dev to build it)")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            print(f"warning: {ext.name} not built ({exc}); the tcp_splice hand-over will run "
                  "in Python (install gcc and python3-dev to build it)")


HANDOVER = Extension(
    "sniproxy.ebpf._handover",
    sources=["src/sniproxy/ebpf/_handover.c"],
    include_dirs=["src/sniproxy/ebpf"],
    depends=["src/sniproxy/ebpf/bpf/sni_proxy_tcp_splice.h",
             "src/sniproxy/ebpf/bpf/sni_proxy_sockstate.h"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-Wno-missing-field-initializers"],
)

setup(cmdclass={"build_py": BuildPyWithBpf, "build_ext": OptionalBuildExt},
      ext_modules=[HANDOVER])
