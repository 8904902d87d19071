"""The Patient and Study attributes every output copies from its source series.

One list for the RTSTRUCT writer and for the SR's evidence (highdicom reads
them by name): Patient (C.7.1.1), General Study (C.7.2.1) and Patient Study
(C.7.2.2). The Type 2 ones are present in every output, empty when the source
lacks them; the Type 3 ones only when the source has them.
"""

TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
TYPE3_COPIED = (
    "IssuerOfPatientID",
    "OtherPatientIDsSequence",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "StudyDescription",
)
