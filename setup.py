from setuptools import setup

setup(cffi_modules=["blkserve/_native_build.py:ffibuilder"])
