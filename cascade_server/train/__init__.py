"""cascade-train: teachers, distilled students, calibration and export. Needs the `train` extra
(torch); the gateway never imports this package."""
