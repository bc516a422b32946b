"""The ONNX frontend: load/save, the graph pass, onnxruntime sessions and the ONNX verifier."""
