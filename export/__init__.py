"""rissole-edge toolchain (PyTorch): data, autoencoder, neighbour database, block denoiser,
training, and later ONNX export. Installed as `rissole_export` by the `[export]` extra.

Data flows one way: data -> autoencoder -> database -> denoiser -> export. The toolchain may
import the runtime (`rissole_edge`) for its schedule; the runtime never imports this package.
"""
