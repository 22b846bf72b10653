"""The tune tests use the fast-inference fixtures of tests/predict."""

from tests.predict.conftest import package_copy, runtime_settings, sample_files  # noqa: F401
