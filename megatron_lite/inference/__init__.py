"""Text generation from a trained model: the KV cache, sampling, and the decoding loop."""
