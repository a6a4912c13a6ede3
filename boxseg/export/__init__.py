"""Exporting SegNet1 / SegNet2 to ONNX, TensorRT engines and AOTInductor packages; each
artifact gets a metadata file <artifact>.json beside it (boxseg.models.meta plus precision,
parity results and how it was built)."""
