"""The gateway tests share the DICOM helpers and fixtures of tests/integration."""

from tests.integration.conftest import ct_study, predictor  # noqa: F401
