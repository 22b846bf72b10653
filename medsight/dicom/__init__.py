"""Hospital integration: the DICOM gateway between MedSight and a PACS / RIS.

* :mod:`medsight.dicom.deid` - PS3.15 Annex E de-identification (``deidentify_dataset``, ``medsight deid``).
* :mod:`medsight.dicom.listener` - Storage SCP that groups received instances into studies and calls
  a study-complete callback (``StorageSCP``); :mod:`medsight.dicom.store` validates and stores instances.
* :mod:`medsight.dicom.pipeline` - the default callback: Predictor -> SR + overlay -> outbox.
* :mod:`medsight.dicom.sr`, :mod:`~medsight.dicom.secondary_capture`, :mod:`~medsight.dicom.fhir`,
  :mod:`~medsight.dicom.hl7` - result objects built from a :class:`~medsight.predict.result.Prediction`.
* :mod:`medsight.dicom.sender` (C-STORE / STOW-RS outbox with retry), :mod:`medsight.dicom.dicomweb` (QIDO/WADO pull).

Submodules are imported on demand so that importing this package stays cheap.
"""
