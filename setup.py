"""Builds the native core (daemon/native, a Rust crate) as the extension module tensord._core;
everything else is in pyproject.toml. Needs cargo (https://rustup.rs) on the building machine;
a built wheel needs nothing."""

from setuptools import setup
from setuptools_rust import Binding, RustExtension

setup(
    rust_extensions=[RustExtension(
        "tensord._core",
        path="daemon/native/Cargo.toml",
        binding=Binding.PyO3,
        features=["python"],
        # One build for every CPython >= 3.11 (PyO3's abi3-py311 feature in Cargo.toml).
        py_limited_api=True,
        # Always optimised: an editable install would otherwise build the ring core in debug.
        debug=False,
    )],
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
