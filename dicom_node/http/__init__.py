"""The operations view over HTTP: pages, JSON API, /metrics and health, served by `dicom-node serve`."""
