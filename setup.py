"""Build hook: compile the BPF programs (`make bpf`) so sdists/wheels carry the .bpf.o objects.

A user installing the wheel needs libbpf1 at run time, not clang.
"""
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
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


setup(cmdclass={"build_py": BuildPyWithBpf})
