"""boxseg-report: a static HTML page of a run (gallery, curves, per-class IoU, confusion,
benchmarks, config) and a headless-Chromium check of it."""
