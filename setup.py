# cffi still needs setup.py for cffi_modules; everything else lives in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["runner/core/build.py:ffibuilder", "plugins/rbd/build.py:ffibuilder"])
