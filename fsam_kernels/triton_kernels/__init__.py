"""The `triton` backend: Triton kernels for every op, registered as torch.ops.fsam_triton.*.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 set
before triton is imported), which is how CI tests it."""
