"""Extension definitions only; metadata lives in pyproject.toml."""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

# RDMAKV_SANITIZE=address,undefined or =thread builds the extension for
# ci/sanitize.sh (run with the sanitizer runtime preloaded into Python).
sanitize = os.environ.get("RDMAKV_SANITIZE", "")
checks = [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"] if sanitize else []

# libibverbs is not linked, so the TCP path imports where libibverbs.so.1 is
# absent: rdmakv/native/__init__.py loads it with RTLD_GLOBAL before importing the
# extension, and rdmakv/native/_verbs_bind.h binds each verbs function at its symbol
# version with dlvsym() (an unversioned reference would get the IBVERBS_1.0
# compat ABI).  `nm -D` on the built module lists no ibv_* symbol.
transport = Extension(
    "rdmakv.native._transport",
    ["rdmakv/native/_transport.pyx", "rdmakv/native/wire.c", "rdmakv/native/verbs_stream.c", "rdmakv/native/worker_engine.c",
     "rdmakv/native/server_engine.c", "rdmakv/native/codec.c", "rdmakv/native/codecs_byteps.c"],
    include_dirs=["rdmakv/native"],
    # -g0 after Python's own -g: no debug info in the wheel (the module is ~10x smaller);
    # a sanitizer build keeps it, for its reports.
    extra_compile_args=["-O1" if sanitize else "-O3", "-fno-strict-aliasing", "-pthread", *(checks or ["-g0"])],
    extra_link_args=["-Wl,-z,lazy", "-pthread", *checks],
)

setup(
    ext_modules=cythonize(
        [transport],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    )
)
