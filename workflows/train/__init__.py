"""Training workflows: simulate a training set, train in PyTorch, export ONNX with a model card."""
