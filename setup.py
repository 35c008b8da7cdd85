"""Build configuration beyond pyproject.toml: the optional C kernels of mstore.codecs.

Everything else (metadata, dependencies, packages) lives in pyproject.toml. The extension is
``optional``: where no C compiler is available the install still succeeds and mstore.codecs
uses its numpy versions of the same kernels, which give identical bytes (only slower).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mstore._planes",
            sources=["mstore/_planes.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
