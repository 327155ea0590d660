//! The causal 3-D VAE.
