"""The single inference path shared by library, CLI, service and DICOM gateway."""
