"""graddyn: see what a preference-optimization run is pulling a language model towards.

The library captures per-item gradients of a preference loss and of its components
(positive learning, negative learning, loss reweighting) during training, stores them in
HDF5 shards, and computes exact gradient alignment against target responses offline.
"""

__version__ = "0.1.0"
