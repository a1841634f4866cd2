//! Strict weight loading from safetensors folders.
