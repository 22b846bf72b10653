"""Hospital integration: the DICOM gateway between MedSight and a PACS / RIS.

* :mod:`medsight.integration.deid` - PS3.15 Annex E de-identification (``deidentify_dataset``, ``medsight deid``).
* :mod:`medsight.gateway.listener` - Storage SCP that groups received instances into studies and calls
  a study-complete callback (``StorageSCP``); :mod:`medsight.gateway.store` validates and stores instances.
* :mod:`medsight.gateway.pipeline` - the default callback: Predictor -> SR + overlay -> outbox.
* :mod:`medsight.integration.sr`, :mod:`~medsight.integration.secondary_capture`, :mod:`~medsight.integration.fhir`,
  :mod:`~medsight.integration.hl7` - result objects built from a :class:`~medsight.predict.result.Prediction`.
* :mod:`medsight.integration.sender` (C-STORE / STOW-RS outbox with retry), :mod:`medsight.gateway.dicomweb` (QIDO/WADO pull).

Submodules are imported on demand so that importing this package stays cheap.
"""
