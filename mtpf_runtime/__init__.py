"""mtpf runtime: serve many NER / classification tasks from one ONNX backbone."""
