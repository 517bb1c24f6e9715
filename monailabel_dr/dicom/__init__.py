"""DICOM for fundus photographs: Ophthalmic Photography images (photo), DICOM SEG lesion labels (seg),
a DICOMweb client with retries (web) and a loopback Orthanc for tests and CI (orthanc)."""
