"""Runtime: what a job delivers: RTSTRUCT, SR, SEG, their codes and notices, and the RTSTRUCT reader.

One module per DICOM object (highdicom's rooms); `dicom_outputs` writes them all.
"""
