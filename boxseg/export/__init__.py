"""Exporting SegNet1 / SegNet2 to ONNX, TensorRT engines and AOTInductor packages; each
artifact gets a metadata file ARTIFACT.json beside it (boxseg.models.meta plus precision,
parity results and how it was built)."""
