"""Build hook: compile the BPF programs (`make bpf`) so sdists/wheels carry the .bpf.o objects,
and the two C extensions of issue 14: the tcp_splice hand-over (sniproxy.ebpf._handover) and
the ClientHello parser's common case (sniproxy.proxy._clienthello).

A user installing the wheel needs libbpf1 at run time, not clang. The extensions need gcc and
the Python headers at build time (python3-dev); the proxy runs without them (the Python
hand-over, the Python parser), so a failed compile is reported, not fatal.
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


# What runs instead when an extension is not built, for the warning.
WITHOUT = {
    "sniproxy.ebpf._handover": "the tcp_splice hand-over will run in Python",
    "sniproxy.proxy._clienthello": "ClientHellos will be parsed in Python only, slower per "
                                   "new connection",
}


def _not_built(names, exc) -> None:
    for name in names:
        print(f"warning: {name} not built ({exc}); {WITHOUT.get(name, 'Python runs instead')} "
              "(install gcc and python3-dev to build it)")


class OptionalBuildExt(build_ext):
    """The compiled extensions are optimisations: without a compiler or python3-dev the
    package still installs and their Python equivalents run (/status, `sni-proxy check` and
    the log say which)."""

    def run(self):
        try:
            super().run()
        except Exception as exc:       # distutils/setuptools raise several error types
            _not_built([ext.name for ext in self.extensions], exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            _not_built([ext.name], exc)


HANDOVER = Extension(
    "sniproxy.ebpf._handover",
    sources=["src/sniproxy/ebpf/_handover.c"],
    include_dirs=["src/sniproxy/ebpf"],
    depends=["src/sniproxy/ebpf/bpf/sni_proxy_tcp_splice.h",
             "src/sniproxy/ebpf/bpf/sni_proxy_sockstate.h"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-Wno-missing-field-initializers"],
)

CLIENTHELLO = Extension(
    "sniproxy.proxy._clienthello",
    sources=["src/sniproxy/proxy/_clienthello.c"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-Wno-missing-field-initializers"],
)

setup(cmdclass={"build_py": BuildPyWithBpf, "build_ext": OptionalBuildExt},
      ext_modules=[HANDOVER, CLIENTHELLO])
