"""The references every path of ours is checked and timed against, one module per framework:
:mod:`cnn.reference.keras` (Keras on TensorFlow) and :mod:`cnn.reference.torch` (PyTorch), each
building our spec with our weights, exchanging weights both ways and training with the same
batches and History columns as :func:`cnn.train.fit`; :mod:`cnn.reference.compare` measures how
far two paths' arrays are apart. Importing the package loads neither framework.
"""
