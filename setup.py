# Kept for tools and habits that still call setup.py; the metadata lives in pyproject.toml.
from setuptools import setup

setup()
