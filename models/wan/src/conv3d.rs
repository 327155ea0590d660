//! Causal 3-D convolution.
