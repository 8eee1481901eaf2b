"""Builds the native ring core (daemon/tensord/transport/_ring.c); everything else is in
pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "tensord.transport._ring",
    sources=["daemon/tensord/transport/_ring.c"],
    extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-Wno-missing-field-initializers", "-Werror"],
)])
